"""`kardia-rl train CONFIG [key=value ...]`: GRPO on the Ray cluster (RAY_ADDRESS / ray.address, else a local
one on 127.0.0.1), then the final policy exported to run_dir/policy."""
from __future__ import annotations

import os


def load_train_samples(cfg) -> list:
    """algo.train_samples (TurnSample JSONL, e.g. the hard split) or the training turns of data.path."""
    from kardia_rl.data import TurnSample
    from kardia_rl.errors import DataError

    if cfg.algo.train_samples:
        from kardia_rl.utils.io import read_jsonl

        path = cfg.algo.train_samples
        if not os.path.isfile(path):
            raise DataError(f"algo.train_samples: {path}: file not found")
        try:
            return [TurnSample.from_record(r) for r in read_jsonl(path)]
        except (TypeError, KeyError, ValueError) as e:
            raise DataError(f"algo.train_samples: {path}: not a per-turn samples file ({e})") from None
    from kardia_rl.learner.sft_data import load_sft_samples

    return load_sft_samples(cfg)[0]


def run_train(cfg) -> dict:
    """GRPO to the end, then export. A dead actor or lost object mid-run (a learner rank, an engine, a judge)
    restarts the trainer from the newest intact checkpoint up to `checkpoint.auto_resume` times; past that, or
    with auto_resume=0, one line says what died and how to resume."""
    from dataclasses import replace

    from kardia_rl.errors import KardiaError
    from kardia_rl.trainer.driver import GRPOTrainer
    from kardia_rl.trainer.preemption import retryable

    from kardia_rl.model.prepare import ensure_prepared

    samples = load_train_samples(cfg)
    policy = ensure_prepared(cfg)  # a hub id, a .gguf or a folder without span tokens is prepared first
    for attempt in range(cfg.checkpoint.auto_resume + 1):
        trainer = GRPOTrainer(cfg, samples, policy)
        try:
            trainer.setup()
            last = trainer.train()
            out = trainer.export(os.path.join(cfg.run_dir, "policy"))
            print(f"[train] done: final policy in {out}")
            return {"policy": out, "last_metrics": last, "steps": cfg.algo.num_steps, "auto_resumes": attempt}
        except Exception as e:  # noqa: BLE001 - only Ray actor/object failures are retried, the rest re-raised
            if not retryable(e):
                raise
            what = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if attempt == cfg.checkpoint.auto_resume:
                raise KardiaError(f"the run failed ({what}) after {attempt} automatic resume(s); continue from the newest "
                                  f"intact checkpoint in {cfg.run_dir}/checkpoints with checkpoint.resume=true "
                                  f"(or set checkpoint.auto_resume > 0)") from e
            print(f"[auto-resume] {attempt + 1}/{cfg.checkpoint.auto_resume} after {what}: restarting from the "
                  f"newest intact checkpoint", flush=True)
            cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, resume=True))
        finally:
            trainer.shutdown()
    raise AssertionError("unreachable")  # the loop returns or raises


def cmd_train(args) -> int:
    from kardia_rl.config import load_config

    from kardia_rl.plan import preflight

    cfg = load_config(args.config, args.overrides)
    preflight(cfg, "train")  # resources, memory and preconditions of GRPO; exit 2 naming the problem
    run_train(cfg)
    return 0


def configure_train(p) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides")


cmd_train.configure = configure_train


def cmd_checkpoints(args) -> int:
    """`kardia-rl checkpoints RUN_DIR`: every checkpoint with its size and status (manifest verified); exit 2 when
    checkpoints exist but none is intact (a resume would fail)."""
    from kardia_rl.errors import KardiaError
    from kardia_rl.trainer.checkpoint import CheckpointManager

    if not os.path.isdir(args.run_dir):
        raise KardiaError(f"{args.run_dir}: no such run directory")
    found = CheckpointManager(args.run_dir).status()
    if not found:
        print(f"{args.run_dir}: no checkpoints")
        return 0
    for path, problems in found:
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)
        state = "ok" if not problems else "DAMAGED: " + "; ".join(problems)
        print(f"{os.path.basename(path)}  {size / 2**20:9.1f} MiB  {state}")
    intact = [p for p, problems in found if not problems]
    print(f"resume would use: {os.path.basename(intact[-1])}" if intact else "no intact checkpoint: resume would fail")
    return 0 if intact else 2


cmd_checkpoints.configure = lambda p: p.add_argument("run_dir", help="run directory (its checkpoints/ folder)")
