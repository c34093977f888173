"""Per-token log-probabilities of response tokens under a causal LM, without materialising more than needed.

Two memory rules, both from the peers' out-of-memory reports at long lengths:
  * the LM head runs only on the last T+1 positions (`logits_to_keep`): prompt positions never produce
    [.., vocab] logits;
  * log-softmax is never materialised: logp(token) = logit[token] - logsumexp(logits), computed on row
    chunks in float32 (bf16 logsumexp over a 150k vocabulary loses ~0.01 nats).

Temperature: the sampler draws from softmax(logits / tau), so the learner must score tokens under the same
distribution (else the importance ratio is off by a temperature factor at every token).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kardia_rl.algo import entropy_from_logits
from kardia_rl.learner.batching import IGNORE_INDEX


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    chunk_rows: int = 4) -> torch.Tensor:
    """log softmax(logits / temperature)[targets] for `logits` [B, T, V] and `targets` [B, T] -> [B, T] fp32."""
    out = []
    for s in range(0, logits.shape[0], chunk_rows):
        x = logits[s:s + chunk_rows].float()
        if temperature != 1.0:
            x = x / temperature
        picked = x.gather(-1, targets[s:s + chunk_rows].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(x, dim=-1))
    return torch.cat(out, dim=0)


@torch.no_grad()
def chunked_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                    chunk_rows: int = 4) -> torch.Tensor:
    """Per-token entropy [B, T] of softmax(logits / temperature), 0 where mask is 0 (monitoring only)."""
    out = []
    for s in range(0, logits.shape[0], chunk_rows):
        x = logits[s:s + chunk_rows].detach().float()
        if temperature != 1.0:
            x = x / temperature
        out.append(entropy_from_logits(x, mask[s:s + chunk_rows]))
    return torch.cat(out, dim=0)


def response_logprobs(model, batch: dict, *, temperature: float = 1.0, with_entropy: bool = False,
                      chunk_rows: int = 4) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logprobs [B, T] of the response tokens of a rollout batch (layout in batching.py) under `model`.

    `model` is anything called like an HF causal LM (a PreTrainedModel, a peft model, a DeepSpeed engine).
    Gradients flow when called with grad enabled. Returns (logprobs, entropy or None); both are 0 where
    response_mask is 0.
    """
    mask = batch["response_mask"]
    T = mask.shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, :-1]  # position t predicts token t+1: the last T+1 logits score the T response tokens
    if logits.shape[1] != T:
        raise RuntimeError(f"model returned {logits.shape[1] + 1} logit positions for logits_to_keep={T + 1}; "
                           "it must support HF's logits_to_keep argument")
    targets = batch["input_ids"][:, -T:]
    logp = gather_logprobs(logits, targets, temperature, chunk_rows)
    valid = mask != 0
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    ent = chunked_entropy(logits, mask, temperature, chunk_rows) if with_entropy else None
    return logp, ent


def sft_loss_sum(model, batch: dict, chunk_rows: int = 4) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions (labels != IGNORE_INDEX) and their count.

    A sum, not a mean: the caller divides by the GLOBAL number of target tokens so micro-batch and
    data-parallel splits give the same loss as one big batch.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    total = logits.new_zeros((), dtype=torch.float32)
    for s in range(0, logits.shape[0], chunk_rows):
        x = logits[s:s + chunk_rows].float()
        y = labels[s:s + chunk_rows]
        total = total + F.cross_entropy(x.reshape(-1, x.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total, int((labels != IGNORE_INDEX).sum())


def mismatch_sums(sums: dict, learner_lp: torch.Tensor, engine_lp: torch.Tensor, mask: torch.Tensor) -> None:
    """Accumulate |learner - engine| and the k3 estimate of KL(engine || learner) over the sampled tokens
    (the engine sampled them, so the estimate is unbiased); padding is masked out before any arithmetic."""
    valid = mask != 0
    d = torch.where(valid, learner_lp.detach().float() - engine_lp.float(), torch.zeros_like(learner_lp.float()))
    sums["diff_sum"] += float(d.abs().sum())
    sums["mismatch_kl_sum"] += float(((torch.exp(d) - d - 1.0) * valid).sum())
    sums["diff_max"] = max(sums.get("diff_max", 0.0), float(d.abs().max()) if d.numel() else 0.0)
