"""Joining or starting the Ray cluster.

`kardia-rl train` joins the cluster named by `ray.address` or `RAY_ADDRESS`; otherwise it starts a local one
bound to 127.0.0.1 only. Ray by default binds and advertises the machine's routable address, and rewrites
`node_ip_address=127.0.0.1` unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set *before* Ray starts, so the
environment is fixed here, in one place, before `import ray`.
"""
from __future__ import annotations

import os

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def init_ray(address: str = "", num_cpus: int = 0, runtime_env: dict | None = None, log_level: str = "warning") -> str:
    """Connect to (or start) Ray; returns a description of the cluster used. Idempotent.

    `log_level` (logging.engine_log_level) is what vLLM engines in actors print: vLLM's default (info) fills the
    console with start-up lines from every engine; it goes to the actors through their environment."""
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", log_level.upper())
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS", "")
    # Workers inherit the CPU/loopback settings the project relies on (DeepSpeed CPU accelerator, vLLM CPU).
    env_vars = {k: os.environ[k] for k in ("DS_ACCELERATOR", "WANDB_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM",
                                           "KARDIA_FAULT_JUDGE_CRASH_FILE", "KARDIA_FAULT_ROLLOUT_KILL_FILE",
                                           "VLLM_LOGGING_LEVEL", "KARDIA_CONSTRUCTION_LOG", "KARDIA_STAGE",
                                           *LOOPBACK_ENV) if k in os.environ}
    renv = {"env_vars": env_vars, **(runtime_env or {})}
    if address:
        # Inside `ray job submit` the job already has a runtime env (working_dir, env vars); Ray refuses to merge
        # it with ours on overlapping keys unless told to combine them.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        _check_reachable(address)
        ray.init(address=address, runtime_env=renv, log_to_driver=True, logging_level=log_level.upper())
        return address
    ray.init(num_cpus=num_cpus or None, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env=renv, log_to_driver=True, logging_level=log_level.upper())
    return "local"


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """One clear line when the cluster's GCS port does not answer: ray.init itself retries for many minutes,
    printing a warning every few seconds. `auto` (a cluster found from the local node) is left to Ray."""
    import socket

    from kardia_rl.errors import KardiaError

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise KardiaError(f"ray.address={address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        source = "RAY_ADDRESS" if address == os.environ.get("RAY_ADDRESS") else "ray.address"
        raise KardiaError(f"{source}={address!r}: no Ray cluster reachable there ({e}); start one with "
                          f"`ray start --head` or leave {source} empty for a local cluster on 127.0.0.1") from None
