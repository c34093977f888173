"""Generation throughput: vLLM vs transformers generate, same prompts, same batch, same run.

    .venv/bin/python bench/bench_generation.py                       # CPU, tiny + small models, fp32
    .venv/bin/python bench/bench_generation.py --device cuda         # GPU, bf16, adds peak memory
    .venv/bin/python bench/bench_generation.py --smoke               # does it still run? (tiny, 8 tokens, no timing)

Method: the batch is P prompts from the bundled test split (chat template applied once, identical token ids
for both engines) x N samples x T new tokens, with min_new_tokens = T so every sample has exactly T tokens
(a random model would never stop anyway; this makes the token counts equal by construction). Each
(engine, model) pair runs in its OWN fresh subprocess: vLLM's in-process engine re-binds OpenMP threads of
the process that creates it, which would skew a transformers run sharing that process. In each worker:
engine start-up (timed separately), W warm-up calls, then R timed calls; tokens/s = generated tokens /
wall time of one `generate` call; the median of R is reported, with min and max. The machine's load
average is printed because CPU numbers on a shared machine move with whatever else runs; with other
processes busy, OpenMP threads spin-waiting on a core someone else holds can slow a 2-thread run 5-10x,
so `--threads 1` gives the steadier comparison there.

`--split-calls 1,2` also measures what a synchronous rollout actor does when two generate calls are queued
on it: the same batch cut into K contiguous chunks (the trainer's own layout function), generated as K
calls one after the other; tokens/s = all generated tokens / wall time of the K calls. The K values
alternate within each repeat on the same engine, so machine load drifts hit them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def build_prompts(tokenizer, count: int) -> list[list[int]]:
    from kardia_rl.data.schema import expand_turns
    from kardia_rl.data.validate import load_dialogues
    from kardia_rl.format.prompt import build_messages, build_prompt

    turns = [t for d in load_dialogues("builtin:sample/test") for t in expand_turns(d)][:count]
    return [tokenizer.encode(build_prompt(tokenizer, build_messages(t.person, t.situation, t.history,
                                                                    system=t.system, max_history_turns=1)),
                             add_special_tokens=False) for t in turns]


def worker(args) -> dict:
    """Measure one engine on one model; prints one JSON line."""
    import torch

    from kardia_rl.engines import make_engine

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = make_engine(args.engine, args.model, seed=0, dtype=args.dtype, max_model_len=args.max_model_len,
                         kv_cache_bytes=args.kv_cache_bytes, enforce_eager=not cuda,
                         gpu_memory_utilization=args.gpu_memory_utilization)
    startup = time.perf_counter() - t0
    prompts = build_prompts(engine.tokenizer, args.prompts)
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    from kardia_rl.cluster.rollout import contiguous_chunks

    splits = [int(k) for k in args.split_calls.split(",")]
    rates: dict[int, list[float]] = {k: [] for k in splits}
    tokens: dict[int, int] = {}
    for i in range(args.warmup + args.repeats):
        for k in splits:
            t, tokens[k] = time.perf_counter(), 0
            for c, idx in enumerate(contiguous_chunks(len(prompts), k)):  # K calls, one after the other
                outs = engine.generate([prompts[j] for j in idx], args.n, seed=1000 * i + c, **kw)
                tokens[k] += sum(len(x.token_ids) for g in outs for x in g)
            if i >= args.warmup:
                rates[k].append(tokens[k] / (time.perf_counter() - t))
    rows = []
    for k in splits:
        row = dict(engine=args.engine, model=os.path.basename(args.model.rstrip("/")), startup_s=round(startup, 2),
                   split_calls=k, tokens_per_call=tokens[k], tokens_per_s_median=round(statistics.median(rates[k]), 1),
                   tokens_per_s_min=round(min(rates[k]), 1), tokens_per_s_max=round(max(rates[k]), 1),
                   prompt_tokens=[len(p) for p in prompts])
        if cuda:
            free, total = torch.cuda.mem_get_info()
            row["torch_peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)  # this process only
            row["device_used_gib"] = round((total - free) / 2 ** 30, 2)  # whole GPU; vLLM pre-reserves its KV cache
        rows.append(row)
    engine.shutdown()
    print("RESULT " + json.dumps(rows), flush=True)
    return rows


def run_worker(args, engine: str, model: str) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--engine", engine, "--model", model]
    for key in ("device", "dtype", "prompts", "n", "max_new_tokens", "warmup", "repeats", "max_model_len",
                "kv_cache_bytes", "gpu_memory_utilization", "split_calls"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ)
    if args.threads:  # before torch/vLLM start in the worker: intra-op threads and vLLM's core binding
        cores = sorted(os.sched_getaffinity(0))[:args.threads]
        env.update(OMP_NUM_THREADS=str(args.threads), VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cores)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{engine} on {model} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--sizes", default="tiny,small", help="comma list of kardia-rl tiny model sizes to build")
    p.add_argument("--model-dir", action="append", default=[], help="benchmark this model dir (repeatable) "
                   "instead of building --sizes")
    p.add_argument("--engines", default="vllm,hf")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="default: 1 GiB on cpu, 0 (use "
                   "--gpu-memory-utilization) on cuda")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per engine (OMP_NUM_THREADS and vLLM's "
                   "core binding); 0 = all cores. On a shared machine 1 avoids OpenMP spin-wait collapse")
    p.add_argument("--split-calls", default="1", help="comma list of K: also generate the batch as K calls in a "
                   "row, as a synchronous actor with K queued calls does (e.g. 1,2)")
    p.add_argument("--smoke", action="store_true", help="does the bench still run (tests/test_bench_smoke.py): "
                   "tiny model, both engines, 2 prompts x 2 samples x 8 tokens, 1 and 2 calls, no warm-up, 1 repeat, "
                   "1 thread; its numbers mean nothing")
    p.add_argument("--json-out", default=None, help="also write the rows to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.engines, args.prompts, args.n, args.max_new_tokens = "tiny", "vllm,hf", 2, 2, 8
        args.warmup, args.repeats, args.split_calls, args.threads = 0, 1, "1,2", 1
        args.kv_cache_bytes = args.kv_cache_bytes or 1 << 27
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.kv_cache_bytes is None:
        args.kv_cache_bytes = 0 if args.device == "cuda" else 1 << 30
    if args.worker:
        worker(args)
        return 0

    models = list(args.model_dir)
    tmp = None
    if not models:
        from kardia_rl.model.tiny import build_tiny_model

        tmp = tempfile.mkdtemp(prefix="kardia-bench-")
        models = [build_tiny_model(os.path.join(tmp, size), size, seed=0) for size in args.sizes.split(",")]
    engines = args.engines.split(",")
    print(f"batch: {args.prompts} prompts x {args.n} samples x {args.max_new_tokens} new tokens "
          f"(min_new_tokens = max_new_tokens), temperature 1, {args.dtype} on {args.device}")
    print(f"method: fresh subprocess per engine/model, {args.warmup} warm-up call(s), {args.repeats} timed "
          f"calls, median tokens/s (min-max); the batch also as K calls in a row for K in {args.split_calls}; "
          f"threads per engine: {args.threads or 'all cores'}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    rows = [row for model in models for engine in engines for row in run_worker(args, engine, model)]
    header = f"{'model':<8} {'engine':<6} {'calls':>5} {'start s':>8} {'tokens/s median':>16} {'(min-max)':>18}"
    if args.device == "cuda":
        header += f" {'peak alloc GiB':>15} {'GPU used GiB':>13}"
    print(header)
    for r in rows:
        line = (f"{r['model']:<8} {r['engine']:<6} {r['split_calls']:>5} {r['startup_s']:>8.1f} "
                f"{r['tokens_per_s_median']:>16.1f} "
                f"{'(' + str(r['tokens_per_s_min']) + '-' + str(r['tokens_per_s_max']) + ')':>18}")
        if args.device == "cuda":
            line += f" {r['torch_peak_alloc_gib']:>15} {r['device_used_gib']:>13}"
        print(line)
    one = [r for r in rows if r["split_calls"] == min(r2["split_calls"] for r2 in rows)]
    if "vllm" in engines and "hf" in engines:
        for model in sorted({r["model"] for r in one}):
            by = {r["engine"]: r for r in one if r["model"] == model}
            print(f"{model}: vllm / hf = {by['vllm']['tokens_per_s_median'] / by['hf']['tokens_per_s_median']:.2f}x")
    for r in rows:  # the batch in one call vs the same batch as K queued calls
        base = next(b for b in one if (b["model"], b["engine"]) == (r["model"], r["engine"]))
        if r is not base:
            print(f"{r['model']} {r['engine']}: {base['split_calls']} call(s) / {r['split_calls']} calls = "
                  f"{base['tokens_per_s_median'] / r['tokens_per_s_median']:.2f}x tokens/s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json_out:
        from kardia_rl.utils.io import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(rows, indent=2) + "\n")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
