"""Checkpoint cost: bytes hashed per save, by whom, against the size of one checkpoint.

Method: Ray local on 127.0.0.1; a real LearnerGroup (DeepSpeed on gloo, `--ranks` ZeRO-`--zero-stage` ranks, fp32,
no reference model) on a local random model (`--size`, kardia_rl.model.tiny); one GRPO train_step on a small random
batch before each save (so the optimizer moments exist, as in a run); `--saves` checkpoints in a row through
CheckpointManager.save with checkpoint.keep_last=`--keep-last`, exactly as the driver saves (the learner group's
save_checkpoint is the learner callback). Bytes hashed are counted, not timed: in the driver by wrapping
kardia_rl.cluster.checkpoint._digest (every checksum the manager computes goes through it: the manifest, pruning's
verification), and in the learner ranks from what each checkpoint's manifest records they hashed
(`verified.hashed_bytes`; a version without that record hashed nothing in the ranks). One checkpoint = the bytes
of its files (manifest excluded). After the saves, one resume lookup (`latest()`, which verifies every checksum
of what it returns) is counted the same way. Wall seconds per save are printed for information only.
Run it against another checkout (e.g. the previous commit, `git worktree add`) with PYTHONPATH=THAT_CHECKOUT to
get its numbers with the same method.

--files-only (no Ray, no DeepSpeed; light enough for a busy machine): the learner callback writes DeepSpeed's file
names for 2 ZeRO-3 ranks (random bytes; sizes of the order of the tiny model's fp32 weights and AdamW moments,
illustrative: the ratio does not depend on them) and, where this version has learner-side hashing
(checkpoint.rank_share), hashes each rank's share in this process as the ranks would. Every checksum is then
computed in this process and counted by the _digest wrapper (thread-safe: hash_files hashes files in threads).

    .venv/bin/python bench/bench_checkpoint.py                       # tiny, 2 ranks ZeRO-3, 5 saves, keep_last 2
    .venv/bin/python bench/bench_checkpoint.py --files-only
    .venv/bin/python bench/bench_checkpoint.py --smoke               # does it still run? (1 rank, 2 saves)
    .venv/bin/python bench/bench_checkpoint.py --size small --saves 4
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, load_line, set_bench_env  # noqa: E402


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns if n != "manifest.json")


# DeepSpeed's files of a 2-rank ZeRO-3 checkpoint; sizes illustrative (see the module doc).
TINY_ZERO3_FILES = {"latest": 5, "zero_to_fp32.py": 33500,
                    "step1/zero_pp_rank_0_mp_rank_00_model_states.pt": 1620000,
                    "step1/zero_pp_rank_1_mp_rank_00_model_states.pt": 1620000,
                    "step1/zero_pp_rank_0_mp_rank_00_optim_states.pt": 4850000,
                    "step1/zero_pp_rank_1_mp_rank_00_optim_states.pt": 4850000}


def files_only_learner(ck):
    def save(d: str):
        for rel, n in TINY_ZERO3_FILES.items():
            os.makedirs(os.path.dirname(os.path.join(d, rel)) or d, exist_ok=True)
            with open(os.path.join(d, rel), "wb") as f:
                f.write(os.urandom(n))
        if not hasattr(ck, "rank_share"):
            return None  # a version without learner-side hashing: the manager hashes everything
        out: dict = {}
        for r in range(2):
            out.update(ck.hash_files(d, ck.rank_share(d, r, 2)))
        return out
    return save


@contextlib.contextmanager
def counted_digests(ck):
    """Counts (thread-safe: hash_files hashes in threads) every byte this process hashes through ck._digest, the
    one function every checksum of the checkpoint manager goes through; yields the one-element counter."""
    counter, real_digest, lock = [0], ck._digest, threading.Lock()

    def counting(path: str) -> str:
        with lock:
            counter[0] += os.path.getsize(path)
        return real_digest(path)

    ck._digest = counting
    try:
        yield counter
    finally:
        ck._digest = real_digest


def run_files_only(args, work: str) -> dict:
    """--files-only: every checksum is computed in this process, so the _digest wrapper counts them all."""
    import kardia_rl.cluster.checkpoint as ck

    with counted_digests(ck) as hashed:
        mgr = ck.CheckpointManager(os.path.join(work, "run"), args.keep_last)
        rows = []
        for step in range(1, args.saves + 1):
            hashed[0] = 0
            path = mgr.save(step, {"bench": step}, files_only_learner(ck))
            size = _size(path)
            rows.append({"save": step, "checkpoint_bytes": size, "on_disk_checkpoints": len(mgr.steps()),
                         "hashed_total": hashed[0], "hashed_over_checkpoint": round(hashed[0] / size, 3)})
            print(json.dumps(rows[-1]), flush=True)
        hashed[0] = 0
        chosen = mgr.latest()
        resume = {"resume_lookup": os.path.basename(chosen), "hashed": hashed[0],
                  "hashed_over_checkpoint": round(hashed[0] / _size(chosen), 3)}
        print(json.dumps(resume), flush=True)
    steady = rows[args.keep_last:] or rows
    return {"mode": "files-only", "keep_last": args.keep_last, "saves": args.saves,
            "checkpoint_bytes": rows[-1]["checkpoint_bytes"],
            "steady_hashed_over_checkpoint": max(r["hashed_over_checkpoint"] for r in steady), "resume": resume}


def run(args, work: str) -> dict:
    import ray

    import kardia_rl.cluster.checkpoint as ck
    from kardia_rl.config import load_config
    from kardia_rl.model.tiny import build_tiny_model
    from kardia_rl.cluster.learner_group import LearnerGroup
    from kardia_rl.cluster.ray_cluster import init_ray

    import torch

    from kardia_rl.algo import group_advantages
    from kardia_rl.learner import collate_rollout

    model = build_tiny_model(os.path.join(work, args.size), args.size, seed=0)
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [
        f"run_dir={work}/run", f"model.path={model}", "model.dtype=float32", "algo.kl_beta=0",
        f"learner.num_workers={args.ranks}", f"learner.zero_stage={args.zero_stage}",
        f"checkpoint.keep_last={args.keep_last}"])
    with counted_digests(ck) as driver_bytes:
        init_ray(num_cpus=2)
        learner = LearnerGroup(cfg, model)
        # One GRPO train_step before each save, as in a run: the checkpoint then holds AdamW's moments too.
        g = torch.Generator().manual_seed(0)
        n = 2 * args.ranks
        prompts = [torch.randint(10, 1000, (16,), generator=g).tolist() for _ in range(n)]
        responses = [torch.randint(10, 1000, (16,), generator=g).tolist() for _ in range(n)]
        batch = collate_rollout(prompts, responses, 0,
                                advantages=group_advantages(torch.rand(n, generator=g), 2).advantages)
        rows = []
        try:
            mgr = ck.CheckpointManager(cfg.run_dir, cfg.checkpoint.keep_last)
            for step in range(1, args.saves + 1):
                learner.train_step(batch)
                driver_bytes[0] = 0
                t0 = time.perf_counter()
                path = mgr.save(step, {"bench": step}, learner.save_checkpoint)
                secs = time.perf_counter() - t0
                with open(os.path.join(path, "manifest.json")) as f:
                    verdict = json.load(f).get("verified", {})
                ranks = sum(v for k, v in verdict.get("hashed_bytes", {}).items() if k != "driver")
                size = _size(path)
                rows.append({"save": step, "checkpoint_bytes": size, "on_disk_checkpoints": len(mgr.steps()),
                             "hashed_by_driver": driver_bytes[0], "hashed_by_ranks": ranks,
                             "hashed_total": driver_bytes[0] + ranks,
                             "hashed_over_checkpoint": round((driver_bytes[0] + ranks) / size, 3),
                             "seconds": round(secs, 3)})
                print(json.dumps(rows[-1]), flush=True)
            driver_bytes[0] = 0
            chosen = mgr.latest()
            resume = {"resume_lookup": os.path.basename(chosen), "hashed_by_driver": driver_bytes[0],
                      "hashed_over_checkpoint": round(driver_bytes[0] / _size(chosen), 3)}
            print(json.dumps(resume), flush=True)
        finally:
            learner.shutdown()
            ray.shutdown()
    steady = rows[args.keep_last:] or rows
    return {"size": args.size, "ranks": args.ranks, "zero_stage": args.zero_stage, "keep_last": args.keep_last,
            "saves": args.saves, "checkpoint_bytes": rows[-1]["checkpoint_bytes"],
            "steady_hashed_over_checkpoint": max(r["hashed_over_checkpoint"] for r in steady),
            "steady_hashed_by_driver": max(r["hashed_by_driver"] for r in steady), "resume": resume}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", help="kardia_rl.model.tiny size: tiny | small")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=3)
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--files-only", action="store_true", help="no Ray/DeepSpeed: a real checkpoint's files (module doc)")
    p.add_argument("--smoke", action="store_true", help="does the bench still run (tests/test_bench_smoke.py): "
                   "1 rank, 2 saves, keep_last 1; its numbers mean nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.ranks, args.saves, args.keep_last = "tiny", 1, 2, 1
    set_bench_env()
    print("method: see the module doc: bytes hashed per save against one checkpoint's bytes; " +
          ("--files-only: DeepSpeed-named files written by the callback, every checksum counted in _digest"
           if args.files_only else "real LearnerGroup (driver: counted in _digest; ranks: the manifest's record), "
           "CheckpointManager.save as the driver calls it"), flush=True)
    print(f"start: {load_line()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        summary = (run_files_only if args.files_only else run)(args, args.workdir or tmp)
    print(json.dumps(summary), flush=True)
    print(f"end: {load_line()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
