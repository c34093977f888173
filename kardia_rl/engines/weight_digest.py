"""Exact, device- and dtype-independent checksums of tensors, for the weight sync's integrity checks.

`digest(t)` reads the tensor's raw bytes (zero-padded to a multiple of 64) as rows of eight 64-bit words; with
r_j the sum of row j's words, it returns two integers computed in int64 arithmetic, which wraps modulo 2^64:
    s1 = sum_j r_j             s2 = sum_j (j + 1) * r_j          (both mod 2^64)
Why this shape:
- bytes, not values: the same bits give the same digest whatever the dtype (fp32, bf16, fp16 ...), and a
  bf16 sync is held to the exact bits sent, which no log-prob tolerance can do;
- integers modulo 2^64 form a ring, so the result does not depend on the order in which torch adds things up
  (CPU threads, a GPU's tree reduction, chunking): a CPU learner and a GPU engine agree bit for bit. torch's
  int64 arithmetic wraps (two's complement) on CPU and CUDA; a float sum would depend on the order;
- speed: only int64 sums and one multiply per row, the reductions torch vectorises (about 2 GB/s on one CPU
  core here, against about 0.1 GB/s for 16-bit word arithmetic; see bench/bench_weight_sync.py);
- rows of 64 bytes = the alignment of every tensor in a bucket (vllm_weight_transfer.ALIGN), so a tensor
  written at a wrong offset, a stale or missing tensor, or any changed word changes s1 or s2. Not a
  cryptographic hash: words swapped inside one 64-byte row, or changes that cancel in both sums, go unseen.

The rotation (`SampleRotation`) decides which engine parameters are read back after each sync: see its docstring.
"""
from __future__ import annotations

from typing import Sequence

import torch

ROW = 64  # bytes per row: 8 int64 words


@torch.no_grad()
def digest(t: torch.Tensor) -> tuple[int, int]:
    """(s1, s2) over the exact bytes of `t` (made contiguous); see the module docstring."""
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    full = b.numel() // ROW * ROW
    rows = b[:full].view(torch.int64).view(-1, ROW // 8).sum(1)
    if full < b.numel():
        tail = b.new_zeros(ROW)
        tail[:b.numel() - full] = b[full:]
        rows = torch.cat([rows, tail.view(torch.int64).sum().reshape(1)])
    if not rows.numel():
        return 0, 0
    weights = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=rows.device)
    return int(rows.sum()), int((rows * weights).sum())


def digest_concat(pieces: Sequence[torch.Tensor], dtype: torch.dtype, rows: int = 0) -> tuple[int, int]:
    """Digest of torch.cat(pieces, 0) cast to `dtype` (a vLLM fused parameter such as qkv_proj is its HF pieces
    stacked along the output dimension), first `rows` rows only when rows > 0 (vocab padding)."""
    t = torch.cat([p.to(dtype) for p in pieces], 0) if len(pieces) > 1 else pieces[0].to(dtype)
    return digest(t[:rows] if rows else t)


class SampleRotation:
    """Which engine parameters to read back after sync number k.

    Every sync: the anchors (the first parameter in model order, i.e. the input embedding, the last one, i.e. the
    final norm or an untied lm_head, and an untied lm_head wherever it sits), because a bug that touches the ends
    of the model (a stale head, a skipped first or last bucket) is the common one and they change at every step.
    Plus a window of `per_sync` of the others, moving on by `per_sync` each sync, so that every parameter is read
    back once every ceil(others / per_sync) syncs (SmolLM2-135M: 181 others, 23 syncs at 8 per sync).
    """

    def __init__(self, names: Sequence[str], anchors: Sequence[str], per_sync: int = 8):
        self.anchors = [n for n in dict.fromkeys(anchors) if n in names]
        self.others = [n for n in names if n not in self.anchors]
        self.per_sync, self.cursor = int(per_sync), 0

    def next(self) -> list[str]:
        if not self.others:
            return list(self.anchors)
        k = min(self.per_sync, len(self.others))
        window = [self.others[(self.cursor + i) % len(self.others)] for i in range(k)]
        self.cursor = (self.cursor + k) % len(self.others)
        return self.anchors + window
