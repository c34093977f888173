"""Process-group set-up for the DeepSpeed learner: one code path for a single CPU process, torchrun /
`deepspeed` launcher ranks, and Ray actors that are told their rank explicitly.

Why the environment matters: `deepspeed.init_distributed` falls back to MPI discovery (and fails on a missing
mpi4py) unless MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK are set, so a lone process sets them
itself (loopback address, a free port). On CPU the communication backend is gloo.

DeepSpeed's CPU communication backend also JIT-compiles a shared-memory all-reduce kernel on first use
(about 35 s on a 2-core machine, and its kernels need AVX2/AVX-512 or the peers hang). gloo alone is
correct and fast enough at our sizes, so on CPU that op is switched off before the first `init_distributed`
(set KARDIA_DS_SHM=1 to keep it).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; there is a small race with other users)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def use_cuda() -> bool:
    return torch.cuda.is_available()


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def as_env(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def rendezvous_env(rank: Optional[int] = None, world_size: Optional[int] = None, local_rank: Optional[int] = None,
                   master_addr: Optional[str] = None, master_port: Optional[int] = None) -> DistEnv:
    """Resolve the rendezvous, preferring explicit arguments, then the launcher's environment, then defaults
    for a single local process (rank 0 of 1 on 127.0.0.1 with a free port).

    A world size above 1 needs an agreed MASTER_PORT: pass it (or set it) in every rank.
    """
    env = os.environ
    rank = int(env.get("RANK", 0)) if rank is None else rank
    world_size = int(env.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(env.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
    master_addr = master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
    if master_port is None:
        if env.get("MASTER_PORT"):
            master_port = int(env["MASTER_PORT"])
        elif world_size == 1:
            master_port = free_port(master_addr)
        else:
            raise ValueError(f"world_size={world_size} needs MASTER_PORT (the same in every rank)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return DistEnv(rank, world_size, local_rank, master_addr, int(master_port))


def _disable_cpu_shm_comm() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (see the module docstring).

    DeepSpeed caches its op-compatibility table in `deepspeed.ops.__compatible_ops__` and documents that
    edits to it persist; marking the op incompatible makes its TorchBackend use plain torch.distributed.
    """
    if use_cuda() or os.environ.get("KARDIA_DS_SHM") == "1":
        return
    import deepspeed.ops

    ops = deepspeed.ops.__compatible_ops__
    ops["deepspeed_shm_comm"] = False
    ops["deepspeed_ccl_comm"] = False


def init_distributed(rank: Optional[int] = None, world_size: Optional[int] = None,
                     local_rank: Optional[int] = None, master_addr: Optional[str] = None,
                     master_port: Optional[int] = None) -> DistEnv:
    """Export the rendezvous variables and initialise DeepSpeed's process group (idempotent).

    CPU: accelerator `cpu`, backend gloo. GPU: backend nccl and this process bound to `cuda:LOCAL_RANK`.
    """
    de = rendezvous_env(rank, world_size, local_rank, master_addr, master_port)
    if not use_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != de.world_size or dist.get_rank() != de.rank:
            raise RuntimeError(f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) already "
                               f"exists; cannot join as rank {de.rank} of {de.world_size}")
    os.environ.update(de.as_env())
    if use_cuda():
        torch.cuda.set_device(de.local_rank)
    _disable_cpu_shm_comm()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_cuda() else "gloo", auto_mpi_discovery=False,
                               rank=de.rank, world_size=de.world_size)
    return de


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over the default group (a no-op without one); `op` is sum | max | min."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
    return t


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank_main(fn, rank: int, world_size: int, port: int, threads: int, queue, args: tuple) -> None:
    import traceback

    torch.set_num_threads(threads)
    try:
        init_distributed(rank, world_size, rank, "127.0.0.1", port)
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # report, then let the parent stop the peers (they may wait in a collective)
        queue.put((rank, False, traceback.format_exc()))


def run_local_ranks(fn, world_size: int, *args, timeout_s: Optional[float] = None) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes forming one process group on
    127.0.0.1 (torch.multiprocessing, spawn); returns the results by rank.

    `fn` must be importable by module name (a top-level function) and return something picklable. If any
    rank fails, the others are terminated (they would wait forever in a collective) and RuntimeError
    carries the failing rank's traceback. CPU threads are split evenly between the ranks.
    """
    import queue as queue_mod
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, threads, q, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            try:
                rank, ok, value = q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} exited with code(s) {[procs[i].exitcode for i in dead]}")
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"ranks did not finish within {timeout_s} s")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [results[r] for r in range(world_size)]
