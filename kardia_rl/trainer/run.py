"""A GRPO run from a config: the training samples, the trainer to the end with automatic resumes, the export.

Used by `kardia-rl train` (trainer/train_cli.py) and the pipeline's GRPO stage; no command-line concerns here.
"""
from __future__ import annotations

import os


def load_train_samples(cfg) -> list:
    """algo.train_samples (TurnSample JSONL, e.g. the hard split) or the training turns of data.path."""
    from kardia_rl.data import TurnSample
    from kardia_rl.errors import DataError

    if cfg.algo.train_samples:
        from kardia_rl.data.sources import read_jsonl

        path = cfg.algo.train_samples
        if not os.path.isfile(path):
            raise DataError(f"algo.train_samples: {path}: file not found")
        try:
            return [TurnSample.from_record(r) for r in read_jsonl(path)]
        except (TypeError, KeyError, ValueError) as e:
            raise DataError(f"algo.train_samples: {path}: not a per-turn samples file ({e})") from None
    from kardia_rl.data.encoding import load_training_turns

    return load_training_turns(cfg)[0]


def run_train(cfg) -> dict:
    """GRPO to the end, then export. A dead actor or lost object mid-run (a learner rank, an engine, a judge)
    restarts the trainer from the newest intact checkpoint up to `checkpoint.auto_resume` times; past that, or
    with auto_resume=0, one line says what died and how to resume."""
    from dataclasses import replace

    from kardia_rl.errors import KardiaError
    from kardia_rl.trainer.driver import GRPOTrainer
    from kardia_rl.cluster.preemption import retryable

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
            return {"policy": out, "last_metrics": last, "steps": cfg.algo.num_steps, "auto_resumes": attempt,
                    "judge": trainer.judge_identity}
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
