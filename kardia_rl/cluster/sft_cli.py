"""`kardia-rl sft CONFIG [key=value ...] [--out DIR]`: the SFT stage from the command line.

Runs as one process (world size 1) by default; under torchrun (`torchrun --nproc_per_node N -m
kardia_rl.cli sft ...`) every rank runs it and RANK/WORLD_SIZE come from the launcher. Prepares model.path first
(a builtin:tiny model is built under run_dir; see kardia_rl.model.prepare). The format check (greedy answers on
the capped validation sample) runs afterwards from rank 0 on a rollout group (cluster.sft_check), in the Ray
cluster of ray.address / RAY_ADDRESS or a local one.
"""
from __future__ import annotations

import argparse
import json

from kardia_rl.config.cli import add_config_args, config_from_args


def configure_sft(p: argparse.ArgumentParser) -> None:
    add_config_args(p, example="sft.epochs=3")
    p.add_argument("--out", default=None, help="output model folder (default: RUN_DIR/sft_model)")
    p.add_argument("--eval-before", action="store_true",
                   help="also measure the format-valid rate before training (greedy, validation split)")
    p.add_argument("--no-generate-eval", action="store_true", help="skip the greedy format-valid evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch default; 1 is fastest on a busy 2-core machine)")


def cmd_sft(args: argparse.Namespace) -> int:
    import os
    from dataclasses import replace

    from kardia_rl.cluster.ray_cluster import init_ray
    from kardia_rl.cluster.sft_check import add_format_check, format_check
    from kardia_rl.data.encoding import load_training_turns
    from kardia_rl.learner.sft import ensure_model, run_sft, val_sample

    cfg = config_from_args(args)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    check = not args.no_generate_eval and int(os.environ.get("RANK", 0)) == 0
    cfg = replace(cfg, model=replace(cfg.model, path=ensure_model(cfg)))
    train, val = load_training_turns(cfg)
    checked = val_sample(val, cfg) if check else []
    if checked:
        init_ray(cfg.ray.address, cfg.ray.num_cpus, log_level=cfg.logging.engine_log_level)
    before = format_check(cfg, cfg.model.path, checked) if args.eval_before and checked else None
    out = args.out or os.path.join(cfg.run_dir, "sft_model")
    res = run_sft(cfg, out, train_samples=train, val_samples=val, progress=not args.no_progress)
    if checked:
        res = add_format_check(cfg, out, res, checked, before)
    summary = {k: res.get(k) for k in ("steps", "train_seconds", "seconds", "train_loss_first", "train_loss_last",
                                       "val_loss_initial", "val_loss_final", "format_valid_rate",
                                       "emotion_accuracy", "out_dir")}
    if "before" in res:
        summary["format_valid_rate_before"] = res["before"]["format_valid_rate"]
    print(json.dumps(summary, indent=2))
    return 0


cmd_sft.configure = configure_sft
