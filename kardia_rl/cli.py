"""`kardia-rl` command line: one table of commands, each named by module path and function name and imported only
when it runs, so `kardia-rl --help` imports no command module (and never ray/vllm/deepspeed/torch). Every command
that reads the config takes `[CONFIG] [key=value ...]` (kardia_rl/config/cli.py). User errors (KardiaError) print
one clear message and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple, Optional, Sequence

from kardia_rl.errors import KardiaError


class Command(NamedTuple):
    module: str
    function: str  # `fn(args) -> exit code`; `fn.configure(parser)`, when present, adds its arguments
    help: str


COMMANDS: dict[str, Command] = {
    "validate-data": Command("kardia_rl.data.cli", "cmd_validate_data",
                             "check KardiaBench data; exit 2 with PATH:LINE: field: message per problem"),
    "init-model": Command("kardia_rl.model.tiny", "cmd_init_model",
                          "build a tiny/small local Qwen2 model and tokenizer (no downloads)"),
    "prepare": Command("kardia_rl.model.prepare", "cmd_prepare",
                       "prepare a hub id, save_pretrained folder or .gguf: span tokens added, chat template kept, "
                       "safetensors in run_dir/prepared_model (or --out)"),
    "chat": Command("kardia_rl.chat", "cmd_chat",
                    "persona chat with a trained policy (--profile FILE or --persona/--situation; --input FILE or "
                    "stdin for scripts)"),
    "config": Command("kardia_rl.config.cli", "cmd_config",
                      "print the merged config (show) or every key with its documentation (docs)"),
    "pipeline": Command("kardia_rl.pipeline", "cmd_pipeline",
                        "the main job: data check -> model -> split -> SFT -> GRPO -> eval -> report"),
    "plan": Command("kardia_rl.plan", "cmd_plan",
                    "preflight: resources vs the cluster, memory per GPU per role, stage preconditions; exit 2 "
                    "naming each problem"),
    "score": Command("kardia_rl.rewards.score_cli", "cmd_score",
                     "unified reward (format, emotion, rubric judge) of model outputs on KardiaBench data"),
    "train": Command("kardia_rl.trainer.train_cli", "cmd_train",
                     "GRPO on the Ray cluster (RAY_ADDRESS, else a local one on 127.0.0.1); exports run_dir/policy"),
    "checkpoints": Command("kardia_rl.trainer.train_cli", "cmd_checkpoints",
                           "list a run's checkpoints with their verified status (size and checksum of every file)"),
    "eval": Command("kardia_rl.evaluation.cli", "cmd_eval",
                    "generate and score test answers; JSON, JSONL, Markdown table like the paper's, PNG plots"),
    "judge-agreement": Command("kardia_rl.evaluation.cli", "cmd_judge_agreement",
                               "per-dimension agreement (Spearman, weighted kappa) between judges or seeds"),
    "judge-calibrate": Command("kardia_rl.evaluation.calibrate", "cmd_judge_calibrate",
                               "fit a calibration head for the embedding judge on human-labelled sets (--data/--format, "
                               "repeatable); held-out and cross-set agreement in the head; use with "
                               "judge.calibration=HEAD"),
    "judge-validate": Command("kardia_rl.evaluation.judge_validate", "cmd_judge_validate",
                              "a judge against human ratings (EPITOME, ESConv, your own JSONL): pairwise accuracy, "
                              "Spearman, weighted kappa, ties; --probes for bias probes"),
    "split": Command("kardia_rl.curriculum.cli", "cmd_split",
                     "difficulty-aware split by resolution rate: easy (SFT) and hard (GRPO) samples"),
    "sft": Command("kardia_rl.cluster.sft_cli", "cmd_sft",
                   "supervised fine-tuning on four-span targets (prompt masked); save_pretrained output"),
    "synthesize": Command("kardia_rl.synth.cli", "cmd_synthesize",
                          "KardiaBench construction: user simulator, responder and rubric evaluator with refinement; "
                          "resumable shards, filtered JSONL, summary"),
}


def load_command(name: str):
    """The function of command `name`, its module imported now."""
    c = COMMANDS[name]
    return getattr(importlib.import_module(c.module), c.function)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """Every command is listed; only `command` (the one that runs) is imported and gets its arguments."""
    parser = argparse.ArgumentParser(prog="kardia-rl", description="kardia-rl: distributed rubric-as-judge RL "
                                     "(Kardia-R1) for persona-aware emotional support")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    for name, c in COMMANDS.items():
        p = sub.add_parser(name, help=c.help, description=c.help)
        if name == command:
            fn = load_command(name)
            getattr(fn, "configure", lambda p: None)(p)
            p.set_defaults(fn=fn)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
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
    sys.exit(main())
