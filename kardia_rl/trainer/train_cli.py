"""`kardia-rl train CONFIG [key=value ...]`: GRPO on the Ray cluster (RAY_ADDRESS / ray.address, else a local
one on 127.0.0.1), then the final policy exported to run_dir/policy (trainer/run.py); `kardia-rl checkpoints`."""
from __future__ import annotations

import os
import signal
import sys

from kardia_rl.config.cli import add_config_args, config_from_args


def cmd_train(args) -> int:
    from kardia_rl.plan import preflight
    from kardia_rl.cluster.preemption import Preempted
    from kardia_rl.trainer.run import run_train

    cfg = config_from_args(args)
    preflight(cfg, "train")  # resources, memory and preconditions of GRPO; exit 2 naming the problem
    try:
        run_train(cfg)
    except Preempted as e:  # SIGTERM: a checkpoint is written; not a failure of the run
        print(f"train: {e}", file=sys.stderr)
        return 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM (as synthesize)
    return 0


cmd_train.configure = add_config_args


def cmd_checkpoints(args) -> int:
    """`kardia-rl checkpoints RUN_DIR`: every checkpoint with its size and status (manifest verified); exit 2 when
    checkpoints exist but none is intact (a resume would fail)."""
    from kardia_rl.errors import KardiaError
    from kardia_rl.cluster.checkpoint import CheckpointManager

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
