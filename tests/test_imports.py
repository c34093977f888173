import subprocess
import sys


def test_data_and_config_do_not_import_heavy_runtimes():
    code = ("import sys, kardia_rl.data, kardia_rl.config, kardia_rl.format\n"
            "heavy = [m for m in ('ray', 'vllm', 'deepspeed', 'torch', 'transformers') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"light modules imported: {out.stdout.strip()}"


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "kardia_rl.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("validate-data", "init-model", "config", "pipeline", "train", "sft", "score", "eval", "split",
                "judge-agreement"):
        assert cmd in out.stdout
