"""`kardia-rl` command line. Each subcommand imports only what it needs, so `--help` and data commands
stay fast and never import ray/vllm/deepspeed. User errors (KardiaError) print one clear message and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence

from kardia_rl.errors import KardiaError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str):
    """Register `fn(args) -> exit code` as a subcommand; `fn.configure(parser)` adds its arguments."""
    def deco(fn):
        COMMANDS[name] = (help_text, getattr(fn, "configure", lambda p: None), fn)
        return fn
    return deco


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algo.group_size=8")


def _load(args):
    from kardia_rl.config import load_config

    return load_config(args.config, args.overrides)


# --- validate-data -------------------------------------------------------------------------------------
def _validate_data(args) -> int:
    from kardia_rl.data import label_set, validate

    labels = label_set(args.labels.split(",") if args.labels else None)
    rep = validate(args.path, labels, args.notation, args.split)
    if rep.problems:
        for line in rep.problems:
            print(line)
        print(f"{len(rep.problems)} problem(s) found in {args.path}", file=sys.stderr)
        return 2
    s = rep.summary()
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"{args.path}: OK: {s['dialogues']} dialogues, {s['turns']} turns, {s['profiles']} profiles, "
              f"{len(s['emotions'])} emotions")
        for emo, n in s["emotions"].items():
            print(f"  {emo:<14} {n}")
    return 0


def _validate_data_args(p):
    p.add_argument("path", help="data file/dir/name (or builtin:sample)")
    p.add_argument("--labels", default="", help="comma-separated emotion label set (default: the 32)")
    p.add_argument("--notation", default="kardia", choices=["kardia", "xml", "auto"])
    p.add_argument("--split", default="train", help="split of a DatasetDict source")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


_validate_data.configure = _validate_data_args
command("validate-data", "check KardiaBench data; exit 2 with PATH:LINE: field: message per problem")(_validate_data)


# --- init-model ----------------------------------------------------------------------------------------
def _init_model(args) -> int:
    from kardia_rl.model.tiny import build_tiny_model

    out = build_tiny_model(args.out, args.size, args.seed, args.overwrite)
    print(f"built {args.size} model and tokenizer in {out}")
    return 0


def _init_model_args(p):
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


_init_model.configure = _init_model_args
command("init-model", "build a tiny/small local Qwen2 model and tokenizer (no downloads)")(_init_model)


# --- prepare / chat ------------------------------------------------------------------------------------
from kardia_rl.chat import cmd_chat  # noqa: E402  (light modules: heavy imports happen inside the commands)
from kardia_rl.model.prepare import cmd_prepare  # noqa: E402

command("prepare", "prepare a hub id, save_pretrained folder or .gguf: span tokens added, chat template kept, "
        "safetensors in run_dir/prepared_model (or --out)")(cmd_prepare)
command("chat", "persona chat with a trained policy (--profile FILE or --persona/--situation; --input FILE or "
        "stdin for scripts)")(cmd_chat)


# --- config --------------------------------------------------------------------------------------------
def _config(args) -> int:
    from kardia_rl.config import documented_fields, to_yaml

    if args.action == "docs":
        for key, default, text in documented_fields():
            print(f"{key} = {default!r}\n    {text}")
        return 0
    print(to_yaml(_load(args)), end="")
    return 0


def _config_cmd_args(p):
    p.add_argument("action", choices=["show", "docs"], help="show: merged config; docs: every key documented")
    _config_args(p)


_config.configure = _config_cmd_args
command("config", "print the merged config (show) or every key with its documentation (docs)")(_config)


# --- pipeline ------------------------------------------------------------------------------------------
def _pipeline(args) -> int:
    from kardia_rl.pipeline import run_pipeline

    return run_pipeline(_load(args))


_pipeline.configure = _config_args
command("pipeline", "the main job: data check -> model -> split -> SFT -> GRPO -> eval -> report")(_pipeline)


# --- plan ----------------------------------------------------------------------------------------------
def _plan_cmd():
    from kardia_rl.plan import cmd_plan  # light: no torch/ray import unless it looks at the local cluster

    return cmd_plan


command("plan", "preflight: resources vs the cluster, memory per GPU per role, stage preconditions; exit 2 "
        "naming each problem")(_plan_cmd())


def build_parser() -> argparse.ArgumentParser:
    import kardia_rl.commands  # noqa: F401  (registers the subcommands of later stages)

    parser = argparse.ArgumentParser(prog="kardia-rl", description="kardia-rl: distributed rubric-as-judge RL (Kardia-R1) "
                                     "for persona-aware emotional support")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    for name, (help_text, configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(fn=fn)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # Options may come after key=value overrides (`kardia-rl eval conf.yaml k=v --model DIR`): argparse stops
    # collecting positionals at the first option, so leftover `key=value` words are appended to the overrides.
    args, extra = parser.parse_known_args(argv)
    unknown = [w for w in extra if "=" not in w or w.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return int(args.fn(args) or 0)
    except KardiaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - not a known failure: keep the traceback, add where to look
        import traceback

        traceback.print_exc()
        print(f"error: unexpected failure in `kardia-rl {args.cmd}` (traceback above); outputs written so far are "
              "complete (atomic), and a re-run with checkpoint.resume=true continues a training run", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m kardia_rl.cli` runs this file as __main__, a second copy of the module; kardia_rl.commands
    # registers into the canonical `kardia_rl.cli`, so dispatch through that one.
    from kardia_rl.cli import main as canonical_main

    sys.exit(canonical_main())
