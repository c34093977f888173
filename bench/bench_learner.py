"""Learner throughput: tokens/s of GRPO `train_step` (forward + backward + optimizer step) on the DeepSpeed
learner, for the local tiny and small models.

Method (printed with the results): build the model locally (no downloads), make a synthetic rollout batch
of `--groups x --group-size` sequences with `--prompt-len` prompt and `--response-len` response tokens
(random ids, group-normalised random rewards as advantages), run `--warmup` untimed steps, then time
`--steps` train_steps. tokens/s counts every token the model processes (prompt + response); response
tokens/s counts the trained ones. CPU: ZeRO-2, world size 1, fp32, client torch AdamW. `--device cuda`:
bf16, same ZeRO stage, plus peak GPU memory (torch.cuda.max_memory_allocated).

    .venv/bin/python bench/bench_learner.py                  # tiny + small on CPU
    .venv/bin/python bench/bench_learner.py --device cuda    # on a GPU machine
    .venv/bin/python bench/bench_learner.py --activation-memory   # small: checkpointing off vs on, vs the plan
    .venv/bin/python bench/bench_learner.py --startup-memory      # small: 2 ZeRO-3 ranks, full vs partitioned load
    .venv/bin/python bench/bench_learner.py --smoke [--activation-memory | --startup-memory]   # does it still run?

Activation memory (`--activation-memory`): each setting runs in a fresh process started with
MALLOC_MMAP_THRESHOLD_=65536, so every tensor above 64 KiB is its own mmap and goes back to the OS when freed
(RSS then follows live memory instead of glibc's retained heap). After one warm-up step (optimizer state and
gradient buffers exist), the peak-RSS counter is reset (/proc/self/clear_refs 5), one train_step runs with the
whole batch in ONE micro-batch, and peak RSS minus the RSS before the step is the step's transient memory:
activations + logits + gradient/optimizer temporaries. The off-minus-on difference isolates the activations
that checkpointing removes; it is compared with the plan's estimate (kardia_rl/plan_estimate.py) of the same
difference. On CUDA the same runs read torch.cuda.max_memory_allocated instead.

Start-up memory (`--startup-memory`): 2 ZeRO-3 ranks (fresh spawned processes, gloo, MALLOC_MMAP_THRESHOLD_=65536)
build the GRPO learner with a reference model (algo.kl_beta > 0) on the last of --sizes, once with
learner.partitioned_init=false (the old way: each rank loads the full model and deep-copies it as the reference)
and once with true (deepspeed.zero.Init: partitioned as loaded). Each rank imports everything and joins the
process group first and builds (then frees) a learner on the tiny model, so that imports, lazily loaded code and
DeepSpeed's one-time buffers are not counted; then it reads RSS (baseline), resets the peak-RSS counter, builds
the learner on the measured model, and reports its peak RSS (VmHWM) in total and above the baseline. Before
that, the same rank measures the load alone (learner/model_init.load_models: policy + reference as held before
DeepSpeed wraps them), peak above its own baseline: the host-RAM peak of a GPU rank, whose DeepSpeed state is on
the GPU. That load is reported twice: VmHWM (which also counts the safetensors file pages mapped while a state dict
is read: page cache, shared by all ranks of a node and reclaimable) and the private memory (RssAnon, polled every
2 ms, since the kernel keeps no peak for it), which is what each rank really allocates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_one(size: str, args, workdir: str) -> dict:
    import torch

    from kardia_rl.algo import group_advantages
    from kardia_rl.config import load_config
    from kardia_rl.learner import collate_rollout
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner
    from kardia_rl.model.tiny import build_tiny_model

    model_dir = os.path.join(workdir, size)
    if not os.path.isdir(model_dir):
        build_tiny_model(model_dir, size, seed=0)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    cfg = load_config(None, [f"learner.zero_stage={args.zero_stage}", f"learner.micro_batch_size={args.micro_batch}",
                             f"model.dtype={dtype}", "algo.kl_beta=0.0", f"model.max_new_tokens={args.response_len}",
                             "learner.lr=1e-5"])
    learner = DeepSpeedLearner(cfg, model_dir)
    g = torch.Generator().manual_seed(0)
    n = args.groups * args.group_size
    vocab = len(learner.tokenizer)
    prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.groups)]
    prompts = [p for p in prompts for _ in range(args.group_size)]
    responses = [torch.randint(10, vocab, (args.response_len,), generator=g).tolist() for _ in range(n)]
    adv = group_advantages(torch.rand(n, generator=g), args.group_size).advantages
    batch = collate_rollout(prompts, responses, learner.tokenizer.pad_token_id, advantages=adv)
    for _ in range(args.warmup):
        learner.train_step(batch)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        m = learner.train_step(batch)
    if args.device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = float(batch["attention_mask"].sum()) * args.steps
    resp = float(batch["response_mask"].sum()) * args.steps
    n_params = sum(p.numel() for p in learner.module.parameters())
    out = {"model": size, "params_M": round(n_params / 1e6, 2), "device": args.device, "dtype": dtype,
           "zero_stage": args.zero_stage, "batch": n, "micro_batch": args.micro_batch,
           "seq_len": args.prompt_len + args.response_len, "step_s": round(dt / args.steps, 3),
           "tokens_per_s": round(tokens / dt, 1), "response_tokens_per_s": round(resp / dt, 1),
           "grad_norm_finite": m["train/grad_norm"] == m["train/grad_norm"], "torch_threads": torch.get_num_threads()}
    if args.device == "cuda":
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def measure_activations(args, checkpointing: bool, model_dir: str) -> dict:
    """One learner step's transient memory (see the module doc); runs in its own process."""
    import torch

    from kardia_rl.algo import group_advantages
    from kardia_rl.config import load_config
    from kardia_rl.learner import collate_rollout
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

    gpu = args.device == "cuda"
    n = args.groups * args.group_size
    cfg = load_config(None, ["learner.zero_stage=2", f"learner.micro_batch_size={n}", "algo.kl_beta=0.0",
                             f"model.dtype={'bfloat16' if gpu else 'float32'}", f"model.max_new_tokens={args.response_len}",
                             f"learner.gradient_checkpointing={str(checkpointing).lower()}"])
    learner = DeepSpeedLearner(cfg, model_dir)
    g = torch.Generator().manual_seed(0)
    vocab = len(learner.tokenizer)
    prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(10, vocab, (args.response_len,), generator=g).tolist() for _ in range(n)]
    batch = collate_rollout(prompts, responses, learner.tokenizer.pad_token_id,
                            advantages=group_advantages(torch.rand(n, generator=g), args.group_size).advantages)
    learner.train_step(batch)
    if gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    m = learner.train_step(batch)
    peak = torch.cuda.max_memory_allocated() if gpu else _status_kb("VmHWM") * 1024
    return {"checkpointing": checkpointing, "step_peak_MiB": round((peak - base) / 2 ** 20, 1),
            "checkpointed_layer_calls": m["train/checkpointed_layer_calls"]}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _startup_rank(rank: int, world_size: int, model_dir: str, partitioned: bool, warm_dir: str) -> dict:
    """One rank's peak RSS while its learner (policy + reference, ZeRO-3) is built (see the module doc)."""
    import gc

    import torch

    from kardia_rl.config import load_config
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner
    from kardia_rl.learner.distributed import init_distributed
    from kardia_rl.learner.model_init import load_models

    init_distributed(rank, world_size)
    cfg = load_config(None, ["learner.zero_stage=3", "algo.kl_beta=0.01", "model.dtype=float32",
                             f"learner.partitioned_init={str(partitioned).lower()}"])
    warm = DeepSpeedLearner(cfg, warm_dir, rank=rank, world_size=world_size)  # imports, lazy code, one-time buffers
    del warm
    gc.collect()
    mib = lambda b: round(b / 2 ** 20, 1)  # noqa: E731

    def reset() -> int:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return _status_kb("VmRSS") * 1024

    # 1. the load alone (policy + reference as this rank holds them before DeepSpeed wraps them): on a GPU cluster
    #    this is the host-RAM peak, since DeepSpeed's own state then lives on the GPU
    import threading

    base = reset()
    anon0, anon_peak, done = _status_kb("RssAnon"), [0], threading.Event()

    def sample() -> None:  # private (anonymous) memory has no kernel peak counter: poll it every 2 ms
        while not done.is_set():
            anon_peak[0] = max(anon_peak[0], _status_kb("RssAnon"))
            done.wait(0.002)

    poller = threading.Thread(target=sample, daemon=True)
    poller.start()
    loaded = load_models(cfg, model_dir, torch.float32, 3, True, {
        "train_micro_batch_size_per_gpu": 1, "train_batch_size": world_size, "zero_optimization": {"stage": 3}})
    done.set()
    poller.join()
    load_peak, load_anon = _status_kb("VmHWM") * 1024 - base, (max(anon_peak[0], _status_kb("RssAnon")) - anon0) * 1024
    del loaded
    # 2. the whole learner start-up (load + DeepSpeed engines, whose buffers are host memory on CPU too)
    base = reset()
    learner = DeepSpeedLearner(cfg, model_dir, rank=rank, world_size=world_size)
    peak = _status_kb("VmHWM") * 1024
    return {"partitioned_init": learner.partitioned_init, "rank": rank, "load_peak_MiB": mib(load_peak),
            "load_peak_private_MiB": mib(load_anon),
            "baseline_MiB": mib(base), "peak_rss_MiB": mib(peak), "startup_peak_above_baseline_MiB": mib(peak - base)}


def startup_report(args, workdir: str) -> list[dict]:
    from kardia_rl.learner.distributed import run_local_ranks
    from kardia_rl.model.tiny import build_tiny_model

    size = args.sizes.split(",")[-1].strip()
    model_dir, warm_dir = os.path.join(workdir, size), os.path.join(workdir, "tiny")
    for d, s in ((model_dir, size), (warm_dir, "tiny")):
        if not os.path.isdir(d):
            build_tiny_model(d, s, seed=0)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks
    weights = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    rows = []
    for partitioned in ((True,) if args.smoke else (False, True)):  # --smoke: the default (partitioned) load only
        for r in run_local_ranks(_startup_rank, 2, model_dir, partitioned, warm_dir, timeout_s=900):
            rows.append({"model": size, "weights_MiB": round(weights / 2 ** 20, 1), **r})
    return rows


def activation_report(args, workdir: str) -> list[dict]:
    import subprocess

    from kardia_rl.model.tiny import build_tiny_model
    from kardia_rl.plan_estimate import activation_bytes, arch_from_config, logits_bytes

    size = args.sizes.split(",")[-1].strip()
    model_dir = os.path.join(workdir, size)
    if not os.path.isdir(model_dir):
        build_tiny_model(model_dir, size, seed=0)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for on in (False, True):
        cmd = [sys.executable, os.path.abspath(__file__), "--_measure", model_dir, "--device", args.device,
               "--groups", str(args.groups), "--group-size", str(args.group_size), "--prompt-len",
               str(args.prompt_len), "--response-len", str(args.response_len), "--threads", str(args.threads)]
        out = subprocess.run(cmd + (["--_ckpt"] if on else []), env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    with open(os.path.join(model_dir, "config.json")) as f:
        arch = arch_from_config(json.load(f))
    b = 2 if args.device == "cuda" else 4
    n, seq = args.groups * args.group_size, args.prompt_len + args.response_len
    est = {on: activation_bytes(arch, n * seq, b, on) / 2 ** 20 for on in (False, True)}
    lg = logits_bytes(arch, n, args.response_len + 1, b) / 2 ** 20
    for r in rows:
        r["plan_activations_MiB"] = round(est[r["checkpointing"]], 1)
        r["plan_logits_MiB"] = round(lg, 1)
    diff_m = rows[0]["step_peak_MiB"] - rows[1]["step_peak_MiB"]
    diff_e = est[False] - est[True]
    rows.append({"model": size, "tokens_per_micro_batch": n * seq, "saved_by_checkpointing_measured_MiB": round(diff_m, 1),
                 "saved_by_checkpointing_plan_MiB": round(diff_e, 1),
                 # at --smoke sizes the measured saving can round to 0 MiB: no ratio then
                 "plan_over_measured": round(diff_e / diff_m, 2) if diff_m > 0 else None})
    return rows


def _print_results(results: list, json_path: str) -> int:
    """One JSON line per measured setting, and the whole list to --json (atomically) when asked."""
    for r in results:
        print(json.dumps(r), flush=True)
    if json_path:
        from kardia_rl.utils.io import atomic_write_text

        atomic_write_text(json_path, json.dumps(results, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", default="tiny,small", help="comma-separated model sizes (kardia_rl.model.tiny.SIZES)")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--groups", type=int, default=None, help="prompts per batch (default: cpu 2, cuda 8)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=None, help="default: cpu 128, cuda 512")
    p.add_argument("--response-len", type=int, default=None, help="default: cpu 128, cuda 512")
    p.add_argument("--micro-batch", type=int, default=None, help="default: cpu 8, cuda 16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--workdir", default=None, help="where the models are built (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--activation-memory", action="store_true",
                   help="step memory with and without gradient checkpointing (last of --sizes) vs the plan's estimate")
    p.add_argument("--startup-memory", action="store_true",
                   help="peak RSS per rank while 2 ZeRO-3 ranks build the learner (last of --sizes): full vs partitioned load")
    p.add_argument("--smoke", action="store_true", help="does the bench still run (tests/test_bench_smoke.py; "
                   "also with --activation-memory / --startup-memory): tiny model, 1 x 2 sequences of 8 + 8 tokens, "
                   "no warm-up, 1 step; its numbers mean nothing")
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)  # internal: one measurement process
    p.add_argument("--_ckpt", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.groups, args.group_size, args.prompt_len, args.response_len = "tiny", 1, 2, 8, 8
        args.micro_batch, args.warmup, args.steps = 2, 0, 1
    gpu = args.device == "cuda"
    args.groups = args.groups or (8 if gpu else 2)
    args.prompt_len = args.prompt_len or (512 if gpu else 128)
    args.response_len = args.response_len or (512 if gpu else 128)
    args.micro_batch = args.micro_batch or (16 if gpu else 8)
    import torch

    if gpu and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args._measure:
        print(json.dumps(measure_activations(args, args._ckpt, args._measure)), flush=True)
        return 0
    if args.startup_memory:
        print("method: see the module doc (--startup-memory): 2 spawned ZeRO-3 ranks per setting, policy + reference, "
              "peak RSS (VmHWM) while the learner is built, after imports and the process group", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results = startup_report(args, args.workdir or tmp)
        return _print_results(results, args.json)
    if args.activation_memory:
        print("method: see the module doc (--activation-memory): fresh process per setting, "
              f"{args.groups * args.group_size} x ({args.prompt_len}+{args.response_len}) tokens in one micro-batch, "
              "step peak above the pre-step baseline", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results = activation_report(args, args.workdir or tmp)
        return _print_results(results, args.json)
    print(f"method: GRPO train_step (fwd+bwd+AdamW step) on DeepSpeed ZeRO-{args.zero_stage}, world size 1, "
          f"{'bf16 on ' + args.device if gpu else 'fp32 on cpu'}; batch {args.groups}x{args.group_size} sequences "
          f"of {args.prompt_len} prompt + {args.response_len} response tokens, micro-batch {args.micro_batch}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; tokens/s = all processed tokens / time", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            r = bench_one(size.strip(), args, args.workdir or tmp)
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        from kardia_rl.utils.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
