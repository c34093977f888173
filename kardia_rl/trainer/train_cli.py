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
    from kardia_rl.trainer.driver import GRPOTrainer

    trainer = GRPOTrainer(cfg, load_train_samples(cfg), cfg.model.path)
    try:
        trainer.setup()
        last = trainer.train()
        out = trainer.export(os.path.join(cfg.run_dir, "policy"))
        print(f"[train] done: final policy in {out}")
        return {"policy": out, "last_metrics": last, "steps": cfg.algo.num_steps}
    finally:
        trainer.shutdown()


def cmd_train(args) -> int:
    from kardia_rl.config import load_config

    run_train(load_config(args.config, args.overrides))
    return 0


def configure_train(p) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides")


cmd_train.configure = configure_train
