"""Clipped-surrogate GRPO policy loss with optional KL term, truncated IS correction and the three token
aggregations found in the literature.

Kept free of Ray/DeepSpeed/vLLM so the exact numbers can be tested on CPU and cross-checked against TRL.
The one rule the trainer must follow: when a global batch is split into micro-batches (and/or across
data-parallel ranks), pass the *global* normalisers (``num_tokens`` / ``num_seqs`` / ``max_len``) to every
call; then the sum of the micro-batch losses (and gradients) equals the full-batch loss exactly, whatever
the micro-batch size or DP degree.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from kardia_rl.config.schema import LOSS_AGGS

from .kl import KL_KINDS, kl_penalty

__all__ = ["policy_loss", "agg_loss", "masked_mean", "entropy_from_logits"]

Number = Union[int, float, torch.Tensor]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero.

    Padding must never dilute a statistic, and an all-padding input must give 0 rather than NaN (an empty
    micro-batch is legal), hence the clamp on the denominator. Masked-out values are replaced by 0 before
    the sum so NaN/inf padding cannot leak in.
    """
    m = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    xs = torch.where(m != 0, x * m, torch.zeros_like(x * m))
    if dim is None:
        return xs.sum() / m.sum().clamp(min=1.0)
    return xs.sum(dim=dim) / m.sum(dim=dim).clamp(min=1.0)


def entropy_from_logits(logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-position entropy ``H = -sum_v p_v log p_v`` of the categorical given by ``logits`` (``[..., V]``).

    Computed through ``log_softmax`` (which subtracts the max) rather than ``softmax().log()`` so large or
    very negative logits cannot produce ``0 * -inf = NaN``; half-precision logits are upcast to float32
    because entropy of a peaked distribution is a small difference of large terms. Used for monitoring
    (entropy collapse is the classic GRPO failure) and for entropy bonuses. With ``mask`` the padded
    positions are set to 0. Returns ``logits.shape[:-1]`` (``[B, T]`` for ``[B, T, V]``).
    """
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = F.log_softmax(x, dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    if mask is not None:
        if mask.shape != ent.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits.shape[:-1] "
                             f"{tuple(ent.shape)}")
        ent = torch.where(mask != 0, ent, torch.zeros_like(ent))
    return ent


def _check_same(name: str, t: Optional[torch.Tensor], shape: torch.Size) -> None:
    if t is not None and t.shape != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match logp shape {tuple(shape)}")


def _positive(name: str, v: Number) -> float:
    val = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
    if not val > 0:
        raise ValueError(f"{name} must be > 0, got {val}")
    return val


def agg_loss(x: torch.Tensor, m: torch.Tensor, agg: str, *, num_tokens: Optional[Number] = None,
             num_seqs: Optional[Number] = None, max_len: Optional[Number] = None) -> torch.Tensor:
    """Reduce per-token values ``x`` ``[B, T]`` under the float mask ``m`` to a scalar (verl's ``agg_loss``).

    ``agg`` (``LOSS_AGGS``, the choices of ``algo.loss_agg``): ``token_mean`` (DAPO / TRL "dapo"/"bnpo":
    every token weighs the same), ``seq_mean_token_mean`` (original GRPO: every sequence weighs the same,
    long answers get diluted per token), ``seq_mean_token_sum_norm`` (Dr. GRPO: a constant normaliser,
    removes the length bias of both). The normalisers default to this call's counts (``T`` for
    ``max_len``) but must be the GLOBAL ones when micro-batching, so that the micro-batch results sum to
    the full-batch value.
    """
    B, T = x.shape
    if agg == "token_mean":
        denom = _positive("num_tokens", num_tokens) if num_tokens is not None else float(m.sum().clamp(min=1.0))
        return (x * m).sum() / denom
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown agg {agg!r}; expected one of {LOSS_AGGS}")
    n_seq = _positive("num_seqs", num_seqs) if num_seqs is not None else float(max(B, 1))
    if agg == "seq_mean_token_mean":
        return ((x * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)).sum() / n_seq
    L = _positive("max_len", max_len) if max_len is not None else float(max(T, 1))
    return (x * m).sum() / (n_seq * L)  # seq_mean_token_sum_norm


def _check_args(logp, old_logp, advantages, mask, *, clip_eps, clip_eps_high, beta, ref_logp, kl_kind, agg,
                engine_logp, is_cap) -> None:
    """Reject bad arguments before any arithmetic, each error naming the argument."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    B = logp.shape[0]
    _check_same("old_logp", old_logp, logp.shape)
    _check_same("mask", mask, logp.shape)
    _check_same("ref_logp", ref_logp, logp.shape)
    _check_same("engine_logp", engine_logp, logp.shape)
    if advantages.shape != (B,):
        raise ValueError(f"advantages must be [B]=[{B}] (one per sequence), got shape "
                         f"{tuple(advantages.shape)}")
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown agg {agg!r}; expected one of {LOSS_AGGS}")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"unknown kl_kind {kl_kind!r}; expected one of {KL_KINDS}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta > 0 (the KL term needs reference log-probs)")
    if clip_eps < 0 or (clip_eps_high is not None and clip_eps_high < 0):
        raise ValueError(f"clip_eps/clip_eps_high must be >= 0, got {clip_eps}/{clip_eps_high}")
    if is_cap is not None and engine_logp is None:
        raise ValueError("is_cap was given without engine_logp; TIS needs the rollout engine's log-probs")
    if is_cap is not None and not float(is_cap) > 0:
        raise ValueError(f"is_cap must be > 0, got {is_cap}")


def _metrics(pg_loss: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor, m: torch.Tensor,
             kl: Optional[torch.Tensor], is_w: Optional[torch.Tensor], eps_low: float,
             eps_high: float, is_clipped: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """The logged numbers (python floats); fractions and means are over this call's masked tokens."""
    with torch.no_grad():
        valid = m != 0
        n_tok = float(m.sum())
        low = ((ratio < 1.0 - eps_low) & (adv < 0) & valid).to(m.dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0) & valid).to(m.dtype)
        frac_low = float(masked_mean(low, m))
        frac_high = float(masked_mean(high, m))
        return {
            "policy_loss": float(pg_loss),
            "kl": float(masked_mean(kl.detach(), m)) if kl is not None else 0.0,
            "clip_frac_low": frac_low,
            "clip_frac_high": frac_high,
            "clip_frac": frac_low + frac_high,
            "ratio_mean": float(masked_mean(ratio.detach(), m)) if n_tok > 0 else 0.0,
            "ratio_max": float(ratio.masked_fill(~valid, float("-inf")).max()) if n_tok > 0 else 0.0,
            "is_weight_mean": float(masked_mean(is_w, m)) if (is_w is not None and n_tok > 0) else 1.0,
            "is_clip_frac": float(masked_mean(is_clipped.to(m.dtype), m)) if (is_clipped is not None and n_tok > 0)
            else 0.0,
        }


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    beta: float = 0.0,
    ref_logp: Optional[torch.Tensor] = None,
    kl_kind: str = "k3",
    agg: str = "token_mean",
    num_tokens: Optional[Number] = None,
    num_seqs: Optional[Number] = None,
    max_len: Optional[int] = None,
    engine_logp: Optional[torch.Tensor] = None,
    is_cap: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """PPO/GRPO clipped surrogate loss over response tokens; returns ``(loss, metrics)``.

    Per token (``A`` = the sequence advantage broadcast over its tokens)::

        ratio = exp(logp - old_logp)
        pg    = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + eps_high) * A) * w_is
        loss  = pg + beta * KL_kind(pi || ref)            (KL only when beta > 0)

    Why each piece:
      * clipping keeps several optimizer steps on one rollout batch from moving the policy too far;
        ``clip_eps_high > clip_eps`` is DAPO's "clip-higher", which leaves room to raise low-probability
        tokens and slows entropy collapse;
      * ``engine_logp`` enables truncated importance sampling (TIS): vLLM's sampling distribution differs
        slightly from the learner's (kernels, precision), so the policy term is reweighted by
        ``w_is = min(exp(old_logp - engine_logp), is_cap)`` (detached, ``is_cap`` default 2.0); the cap
        bounds the variance. The KL term is not reweighted (it is already an estimate under pi);
      * ``agg`` picks the normaliser (see :func:`agg_loss`). ``num_tokens``/``num_seqs`` default to this call's
        counts but must be the GLOBAL counts when micro-batching so losses sum to the full-batch loss;
        ``max_len`` (Dr. GRPO) should be the configured max response length, defaulting to ``T``.

    ``old_logp``, ``ref_logp``, ``engine_logp`` and ``advantages`` are treated as constants (detached);
    gradients flow only through ``logp``. Masked positions are zeroed before any arithmetic, so padding may
    hold anything (even ``-inf``).

    Metrics (python floats, no grad): ``policy_loss`` (the pg term under the same aggregation, so it also
    sums over micro-batches), ``kl`` (masked mean per-token KL, 0.0 without ``ref_logp``),
    ``clip_frac_low`` (ratio < 1-eps with A < 0), ``clip_frac_high`` (ratio > 1+eps_high with A > 0),
    ``clip_frac`` (their sum), ``ratio_mean``, ``ratio_max``, ``is_weight_mean`` (1.0 without TIS), ``is_clip_frac`` (tokens whose IS
    weight the cap cut; 0.0 without TIS); the
    fractions/means are over this call's masked tokens.

    Raises:
        ValueError: naming the argument, for shape mismatches, unknown ``agg``/``kl_kind``, ``beta > 0``
            without ``ref_logp``, non-positive normalisers, ``is_cap`` without ``engine_logp``.
    """
    _check_args(logp, old_logp, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high, beta=beta,
                ref_logp=ref_logp, kl_kind=kl_kind, agg=agg, engine_logp=engine_logp, is_cap=is_cap)
    eps_low = float(clip_eps)
    eps_high = float(clip_eps if clip_eps_high is None else clip_eps_high)

    valid = mask != 0
    m = valid.to(logp.dtype)
    zeros = torch.zeros_like(logp)

    def clean(t: torch.Tensor) -> torch.Tensor:  # keeps garbage at padded positions out of values/grads
        return torch.where(valid, t, zeros)

    lp = clean(logp)
    old = clean(old_logp.detach().to(logp.dtype))
    adv = advantages.detach().to(logp.dtype).unsqueeze(-1)

    # ---- clipped surrogate, importance-weighted ------------------------------------------------------------
    ratio = torch.exp(lp - old)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = -torch.min(ratio * adv, clipped * adv)
    is_w = is_clipped = None
    if engine_logp is not None:
        eng = clean(engine_logp.detach().to(logp.dtype))
        raw_w = torch.exp(old - eng)
        is_w = torch.clamp(raw_w, max=2.0 if is_cap is None else float(is_cap))
        is_clipped = raw_w > is_w  # tokens whose weight the cap cut (train/is_clip_frac)
        pg = pg * is_w

    # ---- KL to the reference (in the loss when beta > 0, else only logged) ---------------------------------
    per_token, kl = pg, None
    if ref_logp is not None:
        ref = clean(ref_logp.detach().to(logp.dtype))
        if beta > 0:
            kl = kl_penalty(lp, ref, kl_kind)
            per_token = per_token + beta * kl
        else:  # only logged: no autograd graph needed
            with torch.no_grad():
                kl = kl_penalty(lp, ref, kl_kind)

    # ---- aggregation and metrics ---------------------------------------------------------------------------
    norms = dict(num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    loss = agg_loss(per_token, m, agg, **norms)
    pg_loss = agg_loss(pg.detach(), m, agg, **norms)
    return loss, _metrics(pg_loss, ratio, adv, m, kl, is_w, eps_low, eps_high, is_clipped)
