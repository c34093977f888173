"""The loss's fp32 temporaries over the vocabulary, measured, next to the plan's term for them.

Method: one process, one thread. A logits tensor [rows, positions, vocab] (fp32 or bf16, requires grad) is built
first; then for each loss function of kardia_rl/learner/logprobs.py, with rows = its chunk_rows (one chunk), the
peak-RSS counter is reset (/proc/self/clear_refs 5) and the function runs; peak RSS (VmHWM) minus RSS before it is
its transient memory, divided by one fp32 chunk (rows x positions x vocab x 4 bytes). Each is run once untimed
first, so allocator warm-up is not counted. Tensors this large are separate mmaps that go back to the OS when
freed, so RSS follows live memory. Rows:
  chunked_entropy (no grad, GRPO's entropy metric): peak during the call;
  gather_logprobs + backward (GRPO's log-probs): forward peak, and backward peak above what the forward kept
    (the logits' gradient, rows x positions x vocab x dtype bytes, included);
  cross-entropy + backward (SFT's loss, as sft_loss_sum computes it).
The plan (kardia_rl/plan_estimate.py) counts the kept fp32 copy and the logits' gradient in `logits_bytes` and the
rest in `loss_temporary_bytes` (LOSS_TEMP_COPIES fp32 chunks per role).

    .venv/bin/python bench/bench_loss_memory.py                 # fp32 and bf16, 4 x 256 x 32000
    .venv/bin/python bench/bench_loss_memory.py --vocab 152064 --positions 513   # Qwen2.5-7B's vocabulary
    .venv/bin/python bench/bench_loss_memory.py --smoke         # does it still run? (tiny sizes, fp32)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _peak_of(fn) -> tuple[int, object]:
    """(peak RSS above the RSS before the call, the call's result)."""
    base = _kb("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    return _kb("VmHWM") * 1024 - base, out


def measure(dtype_name: str, positions: int, vocab: int, temperature: float) -> dict:
    import torch
    import torch.nn.functional as F

    from kardia_rl.learner.logprobs import chunked_entropy, gather_logprobs
    from kardia_rl.plan_estimate import LOSS_CHUNK_ROWS, LOSS_TEMP_COPIES

    rows = LOSS_CHUNK_ROWS
    chunk = rows * positions * vocab * 4
    logits = torch.randn(rows, positions, vocab).to(getattr(torch, dtype_name)).requires_grad_(True)
    targets, mask = torch.randint(0, vocab, (rows, positions)), torch.ones(rows, positions)

    def backward_peak(loss_fn) -> tuple[float, float]:
        for _ in range(2):  # the first run warms up
            logits.grad = None
            fwd, loss = _peak_of(loss_fn)
            peak, _ = _peak_of(loss.backward)
            del loss
        return fwd / chunk, peak / chunk

    def sft_ce():
        x = logits.float()
        return F.cross_entropy(x.reshape(-1, vocab), targets.reshape(-1), reduction="sum")

    chunked_entropy(logits, mask, temperature)
    ent, _ = _peak_of(lambda: chunked_entropy(logits, mask, temperature))
    g_fwd, g_bwd = backward_peak(lambda: gather_logprobs(logits, targets, temperature).sum())
    s_fwd, s_bwd = backward_peak(sft_ce)
    grad = logits.numel() * logits.element_size() / chunk
    return {"dtype": dtype_name, "rows": rows, "positions": positions, "vocab": vocab, "temperature": temperature,
            "fp32_chunk_MiB": round(chunk / 2 ** 20, 1),
            "grpo_entropy_chunks": round(ent / chunk, 2),
            "grpo_logprobs_forward_peak_chunks": round(g_fwd, 2), "grpo_logprobs_backward_chunks": round(g_bwd, 2),
            "sft_ce_forward_peak_chunks": round(s_fwd, 2), "sft_ce_backward_chunks": round(s_bwd, 2),
            "logits_grad_chunks": round(grad, 2),
            "plan_grpo_chunks": LOSS_TEMP_COPIES["GRPO"], "plan_sft_chunks": LOSS_TEMP_COPIES["SFT"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--smoke", action="store_true", help="does the bench still run (tests/test_bench_smoke.py): "
                   "16 positions x 2,000 vocabulary, fp32 only; its numbers mean nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.positions, args.vocab, args.dtypes = 16, 2000, "float32"
    import torch

    torch.set_num_threads(1)
    print("method: see the module doc: peak RSS (VmHWM) above the RSS before each call, in fp32 chunks "
          "(chunk_rows x positions x vocab x 4 bytes); one process, one thread", flush=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for d in args.dtypes.split(","):
        print(json.dumps(measure(d.strip(), args.positions, args.vocab, args.temperature)), flush=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
