"""The one command table (kardia_rl/cli.py): lazy imports, every command resolvable, one config convention."""
import argparse
import subprocess
import sys

import pytest

from kardia_rl import cli


def test_help_imports_no_command_module_and_no_heavy_runtime():
    code = """
import contextlib, io, sys
from kardia_rl.cli import main
with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
    main(["--help"])
assert "judge-agreement" in help_text.getvalue()
heavy = {m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("ray", "vllm", "deepspeed", "torch")}
ours = {m for m in sys.modules if m.startswith("kardia_rl.") and m not in ("kardia_rl.cli", "kardia_rl.errors")}
print(",".join(sorted(heavy | ours)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`kardia-rl --help` imported: {out.stdout.strip()}"


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_resolves_and_configures(name):
    fn = cli.load_command(name)
    assert callable(fn) and callable(fn.configure)
    parser = cli.build_parser(name)  # the command's own arguments are added without error
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sub.choices[name].get_default("fn") is fn
    assert all(sub.choices[other].get_default("fn") is None for other in cli.COMMANDS if other != name)


def test_a_first_positional_override_is_an_override_for_every_command(capsys):
    # `kardia-rl config show key=value`: no config file named "algo.group_size=4" is looked for
    assert cli.main(["config", "show", "algo.group_size=4", "algo.prompts_per_step=2"]) == 0
    shown = capsys.readouterr().out
    assert "group_size: 4" in shown and "prompts_per_step: 2" in shown


def test_unknown_command_and_stray_words_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["checkpoints", "/tmp", "stray"])
    assert e.value.code == 2
