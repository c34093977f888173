"""The placement audit: where every model was built and where every pool call ran.

When $KARDIA_CONSTRUCTION_LOG names a directory, every construction of a generation engine
(engines.make_engine) and of a judge that loads a model (rewards.judge.make_judge: vllm, hf, embedding), and
every generate / judge call a rollout or judge actor serves, appends one JSON line to
DIR/constructions.jsonl: {"event": "construct" | "call", "kind", "model", "pid", "stage", "actor_id",
"gpu_ids", ...}. `actor_id` and `gpu_ids` are Ray's (`get_actor_id()`, `ray.get_gpu_ids()`) when the process
is a Ray actor, else null: a model built in a driver or a stage's child process shows as actor_id null.
`stage` is $KARDIA_STAGE (the pipeline sets it in each stage's process; cluster.ray_cluster.init_ray passes
both variables on to the actors it starts).

Why a file and not counters: the constructions happen in many processes (stage children, Ray actors, vLLM
workers); one O_APPEND write per line is atomic on a local file system, so the lines of concurrent writers
never interleave. Unset (every normal run), `record` costs one environment lookup.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

LOG_ENV = "KARDIA_CONSTRUCTION_LOG"
STAGE_ENV = "KARDIA_STAGE"
LOG_FILE = "constructions.jsonl"


def _ray_placement() -> tuple[Optional[str], Optional[list]]:
    """(actor id, GPU ids) when this process is a Ray actor, else (None, None). Ray is never imported here: a
    process that has not imported it is no actor."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None, None
    actor = ray.get_runtime_context().get_actor_id()
    if actor is None:
        return None, None
    return actor, [str(g) for g in ray.get_gpu_ids()]


def record(event: str, kind: str, model: str = "", **extra) -> None:
    """Append one line (see the module docstring) when $KARDIA_CONSTRUCTION_LOG is set."""
    folder = os.environ.get(LOG_ENV)
    if not folder:
        return
    actor, gpus = _ray_placement()
    line = {"event": event, "kind": kind, "model": str(model), "pid": os.getpid(),
            "stage": os.environ.get(STAGE_ENV) or None, "actor_id": actor, "gpu_ids": gpus, **extra}
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOG_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def read_log(folder: str) -> list[dict]:
    """Every line written under `folder` (tests and audits)."""
    path = os.path.join(folder, LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
