"""Host memory of an export (save_pretrained) on 2 ZeRO-3 ranks: peak RSS growth per rank, rank 0 writing shard by
shard while rank 1 only joins the gathers, side by side with the all-ranks gather (every rank builds the full state
dict on CPU, rank 0 writes it: what every export did before it was rank 0's alone).

Method: 2 fresh spawned ranks (torch.multiprocessing, gloo on 127.0.0.1, MALLOC_MMAP_THRESHOLD_=65536 so that
every tensor above 64 KiB is its own mmap and goes back to the OS when freed: RSS then follows live memory, not
glibc's retained heap) build a ZeRO-3 DeepSpeedLearner (fp32, no reference model) on a local random model
(kardia_rl.model.tiny, --size) and export it once in the measured mode to warm up (imports, lazily loaded code,
safetensors), then, per mode: gc, reset the peak-RSS counter (/proc/self/clear_refs 5), read RSS (baseline), export,
and report VmHWM minus the baseline (peak RSS growth during the export) and the private memory's peak growth
(RssAnon polled every 2 ms; the kernel keeps no peak for it). The two modes run in the same ranks one after the
other, the rank-0 mode first; both write with the same writer (learner/export.py write_hf_folder), so the
difference is what each rank holds, not how the files are written. Numbers are in MiB and as a multiple of the
model's exported weights (fp32 bytes of its parameters).

    .venv/bin/python bench/bench_export_memory.py                 # small model (~20M parameters, ~80 MiB fp32)
    .venv/bin/python bench/bench_export_memory.py --smoke         # does it still run? (tiny model)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_line, set_bench_env  # noqa: E402

MODES = ("rank0", "all_ranks")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _export(learner, mode: str, out_dir: str) -> None:
    """One export, collective on every rank. all_ranks: each rank copies the whole model to CPU (the old path)."""
    from kardia_rl.learner.distributed import barrier
    from kardia_rl.learner.export import save_hf_folder

    if mode == "rank0":
        learner.save_pretrained(out_dir)
        return
    sd = learner.hf_state_dict()  # every rank: a full CPU copy
    if learner.rank == 0:
        save_hf_folder(sd, out_dir, learner.hf_config, generation_config=learner.generation_config,
                       tokenizer=learner.tokenizer)
    barrier()


def _rank(rank: int, world_size: int, model_dir: str, work: str) -> list[dict]:
    import gc
    import threading

    from kardia_rl.config import load_config
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner
    from kardia_rl.learner.distributed import init_distributed

    init_distributed(rank, world_size)
    cfg = load_config(None, ["learner.zero_stage=3", "algo.kl_beta=0", "model.dtype=float32"])
    learner = DeepSpeedLearner(cfg, model_dir, rank=rank, world_size=world_size)
    rows = []
    for mode in MODES:
        _export(learner, mode, os.path.join(work, f"warm_{mode}"))  # imports, lazy code, one-time buffers
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        base, anon0, anon_peak, done = _status_kb("VmRSS"), _status_kb("RssAnon"), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                anon_peak[0] = max(anon_peak[0], _status_kb("RssAnon"))
                done.wait(0.002)

        poller = threading.Thread(target=sample, daemon=True)
        poller.start()
        _export(learner, mode, os.path.join(work, mode))
        done.set()
        poller.join()
        rows.append({"mode": mode, "rank": rank, "peak_rss_growth_MiB": round((_status_kb("VmHWM") - base) / 1024, 1),
                     "private_peak_growth_MiB": round((max(anon_peak[0], _status_kb("RssAnon")) - anon0) / 1024, 1)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", help="kardia_rl.model.tiny size: tiny | small")
    p.add_argument("--smoke", action="store_true", help="tiny model: does it still run?")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    set_bench_env()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks
    size = "tiny" if args.smoke else args.size
    from kardia_rl.learner.distributed import run_local_ranks
    from kardia_rl.model.tiny import build_tiny_model

    print(f"# {load_line()}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        model_dir = build_tiny_model(os.path.join(work, size), size, seed=0)
        from transformers import AutoConfig

        from kardia_rl.plan_estimate import arch_from_config

        arch = arch_from_config(AutoConfig.from_pretrained(model_dir).to_dict())
        model_mib = 4 * arch.params() / 2 ** 20
        rows = [r for per in run_local_ranks(_rank, 2, model_dir, work, timeout_s=900) for r in per]
    for r in rows:
        r["model_fp32_MiB"] = round(model_mib, 1)
        r["growth_over_model"] = round(r["peak_rss_growth_MiB"] / model_mib, 2)
        print(json.dumps({"size": size, **r}), flush=True)
    by = {(r["mode"], r["rank"]): r for r in rows}
    print(f"\nexport of the {size} model ({model_mib:.1f} MiB fp32) on 2 ZeRO-3 ranks: peak RSS growth per rank, MiB "
          "(x model)")
    print(f"{'rank':>4} | {'rank 0 writes, others gather':>28} | {'all ranks copy (old)':>22}")
    for rank in (0, 1):
        new, old = by[("rank0", rank)], by[("all_ranks", rank)]
        print(f"{rank:>4} | {new['peak_rss_growth_MiB']:>18.1f} ({new['growth_over_model']:>4.2f}x) | "
              f"{old['peak_rss_growth_MiB']:>12.1f} ({old['growth_over_model']:>4.2f}x)")
    print("method: see the module doc (2 spawned ZeRO-3 ranks, VmHWM growth during one export after a warm-up export)")
    if args.json:
        from kardia_rl.utils.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
