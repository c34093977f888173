"""The offline embedding judge on the candidates of a tiny GRPO step: CPU seconds and wall seconds per step.

    .venv/bin/python bench/bench_embedding_judge.py              # 1 warm-up + 4 measured steps (~1 min)
    .venv/bin/python bench/bench_embedding_judge.py --steps 8
    .venv/bin/python bench/bench_embedding_judge.py --smoke      # does it still run? (1 tiny step, no timing)
    .venv/bin/python bench/bench_embedding_judge.py --calibration HEAD   # the judge with a calibration head

Method (also printed by the run):
- Candidates: the same local `tiny` model as bench_grpo_step.py (random init, fp32), the same P=4 prompts of
  the bundled training split, N=8 samples each, temperature 1, 128 new tokens, generated with the transformers
  engine (seeded per step, so every step has fresh texts and no judgment is a cache hit). A random model's
  text is about 215 MiniLM word-pieces per candidate, close to the encoder's 256-token window.
- Judge: kardia-rl's UnifiedReward with an in-process EmbeddingJudge and judge.judge_malformed=true (every
  candidate is judged), called the way a judge actor is called in bench_grpo_step.py: one judge instance
  for the whole run (as one actor), `--chunks` calls per step, each with the candidates of a contiguous
  share of the prompts (default 2 calls of 2 prompts x 8 candidates: the trainer's chunking with 1 rollout
  actor when the "before" numbers were taken; the trainer now sends one chunk per rollout actor, i.e.
  `--chunks 1` there). The first step is a warm-up (model load, exemplar sets) and is excluded.
- One thread (torch.set_num_threads(1), OMP_NUM_THREADS=1), as every process in bench_grpo_step.py.
- Numbers per step: wall seconds (time.perf_counter) and this process's CPU seconds (time.process_time).
  With one compute thread the CPU seconds hardly move with the machine's load, so they are the number to
  compare between runs on a shared machine; the wall seconds are what a step waits for. Median over steps.
- Scores: a SHA-256 digest of every candidate's five rounded dimension scores over all steps, so two runs
  (e.g. before and after a change to the judge) show whether they scored identically.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_samples, build_models, load_line, median, other_processes_busy, set_bench_env  # noqa: E402


def generate(model_dir: str, samples, cfg, steps: int, n: int, max_new_tokens: int, seed: int) -> list:
    """Per step: one list of N completion texts per prompt."""
    from transformers import AutoTokenizer

    from kardia_rl.engines import make_engine
    from kardia_rl.data.encoding import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [encode_prompt(s, tok, cfg) for s in samples]
    engine = make_engine("hf", model_dir, seed=seed)
    try:
        return [[[c.text for c in per] for per in engine.generate(prompts, n, temperature=1.0, top_p=1.0,
                                                                  max_new_tokens=max_new_tokens, seed=seed + k)]
                for k in range(steps)]
    finally:
        engine.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--chunks", type=int, default=2, help="judge calls per step (the step's generation chunks)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="does the bench still run (tests/test_bench_smoke.py): "
                   "1 prompt x 2 candidates x 8 tokens, 1 call, no warm-up, 1 step; its numbers mean nothing")
    p.add_argument("--json-out", default=None)
    p.add_argument("--calibration", default="", metavar="HEAD",
                   help="judge.calibration: a head from `kardia-rl judge-calibrate` (default: none, the proxy)")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.group_size, args.chunks, args.max_new_tokens, args.warmup, args.steps = 1, 2, 1, 8, 0, 1
    set_bench_env(1)
    import torch

    torch.set_num_threads(1)
    from kardia_rl.config import load_config
    from kardia_rl.rewards.judge.embedding import EmbeddingJudge
    from kardia_rl.rewards.unified import UnifiedReward
    from kardia_rl.cluster.rollout import contiguous_chunks

    print(f"bench_embedding_judge: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"start: {load_line()}")
    busy = other_processes_busy()
    print("other busy processes at start: " + ("; ".join(busy[:6]) if busy else "none"))
    print(__doc__.split("Method (also printed by the run):\n")[1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "conf", "tiny.yaml"),
                      ["data.max_history_turns=1", "judge.backend=embedding", "judge.judge_malformed=true"]
                      + ([f"judge.calibration={args.calibration}"] if args.calibration else []))  # `key=` reads as None
    samples = bench_samples(args.prompts)
    n, total = args.group_size, args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="kardia-bench-judge-") as work:
        model_dir = build_models(["tiny"], work)["tiny"]
        texts = generate(model_dir, samples, cfg, total, n, args.max_new_tokens, args.seed)
    reward = UnifiedReward(cfg.reward, cfg.judge, EmbeddingJudge.from_config(cfg.judge, cfg.seed),
                           history_mode=cfg.data.history, max_history_turns=cfg.data.max_history_turns)
    rows, digest = [], hashlib.sha256()
    for k in range(total):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        scored = []
        for idx in contiguous_chunks(len(samples), args.chunks):
            scored += asyncio.run(reward.score([samples[j] for j in idx for _ in range(n)],
                                               [t for j in idx for t in texts[k][j]],
                                               [f"{k}:{j}" for j in idx for _ in range(n)]))
        rows.append({"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
                     "judged": sum(b.judged and not b.judge_failed for b in scored), "load": os.getloadavg()[0]})
        digest.update(json.dumps([b.dims for b in scored], sort_keys=True).encode())
    measured = rows[args.warmup:]
    print(f"per step ({len(samples) * n} candidates, {args.chunks} calls): "
          + "  ".join(f"wall {r['wall_s']:.3f} s / cpu {r['cpu_s']:.3f} s (load {r['load']:.1f})" for r in measured))
    wall, cpu = median([r["wall_s"] for r in measured]), median([r["cpu_s"] for r in measured])
    print(f"median of {len(measured)} steps after {args.warmup} warm-up: wall {wall:.3f} s, cpu {cpu:.3f} s; "
          f"judged {measured[0]['judged']}/{len(samples) * n} per step")
    print(f"scores digest (all {total} steps): {digest.hexdigest()[:16]}")
    print(f"end: {load_line()}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "steps": rows, "wall_s": wall, "cpu_s": cpu,
                       "digest": digest.hexdigest()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
