"""Per-token KL estimators between the policy and a frozen reference model.

We never have the full distributions at hand cheaply, only the log-probs of the *sampled* tokens, so the
KL(pi || ref) is estimated from samples of pi with John Schulman's k1/k2/k3 estimators
(http://joschu.net/blog/kl-approx.html). Two ways of using them live here: as a loss term (GRPO, see
``policy_loss``) and folded into the reward (classic RLHF-PPO, :func:`apply_kl_to_rewards`).
"""
from __future__ import annotations

import torch

from kardia_rl.config.schema import KL_ESTIMATORS

__all__ = ["kl_penalty", "apply_kl_to_rewards", "KL_KINDS"]

#: Accepted ``kind`` values: the config's estimators and "low_var_kl", verl's name for k3.
KL_KINDS = KL_ESTIMATORS + ("low_var_kl",)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Elementwise estimate of KL(pi || ref) at tokens sampled from pi.

    With ``log_r = ref_logp - logp``:

    * ``k1 = -log_r = logp - ref_logp`` — unbiased but high variance and can be negative per token; its
      sequence sum is the exact log-likelihood ratio, which is why it is the usual choice for KL-in-reward.
    * ``k2 = 0.5 * log_r**2`` — always >= 0, low variance, biased as a value.
    * ``k3 = exp(log_r) - log_r - 1`` — always >= 0, unbiased *and* low variance; the default of GRPO, TRL
      (``beta > 0``) and verl ("low_var_kl").

    Note for use as a *loss* (differentiated w.r.t. logp at on-policy samples): k1's expected gradient is 0,
    k2's equals the gradient of KL(pi || ref), and k3's equals that of the forward KL(ref || pi). k3 is kept as
    the default because it is what GRPO/TRL/verl use and it behaves well in practice; pick k2 if the exact
    reverse-KL gradient matters.

    No clamping is applied, so the values (and gradients) are exactly the formulas above; callers feeding
    garbage log-probs (e.g. ``-inf`` for padding) must mask before reducing.

    Raises:
        ValueError: shape mismatch or unknown ``kind``.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown kl kind {kind!r}; expected one of {KL_KINDS}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} does not match logp shape "
                         f"{tuple(logp.shape)}")
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    return torch.exp(log_ratio) - log_ratio - 1.0  # k3 / low_var_kl


def apply_kl_to_rewards(
    rewards: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kind: str = "k1",
) -> torch.Tensor:
    """Return ``rewards - beta * sum_t(kl_t * mask_t)``: the "KL in reward" alternative to a KL loss term.

    Why offer both: putting the KL into the reward (InstructGPT-style) makes the penalty part of what the
    advantage normalisation sees, so a sequence that drifted far from the reference is ranked lower within
    its group; a KL *loss* term (GRPO-style) instead regularises every token directly and leaves the
    rewards untouched. Use one or the other, not both. The result is detached: it is a reward, not a path
    for gradients. ``kind`` defaults to k1, the only unbiased choice here: the reward reaches the policy
    through the score function, and ``E[grad log pi(y) * sum_t k1_t]`` is exactly ``grad KL(pi || ref)``
    (the summed k1 is the sequence log-ratio). k2/k3 are fine loss terms, but as a reward the same product
    drops their own dependence on pi, so the penalty's gradient is biased.

    Args:
        rewards: ``[B]`` scalar rewards per completion.
        logp, ref_logp: ``[B, T]`` per-token log-probs of the response under policy / reference.
        mask: ``[B, T]``, 1 for real response tokens (padding must not contribute).
        beta: KL coefficient (``0`` returns the rewards unchanged).
        kind: estimator, see :func:`kl_penalty`.

    Raises:
        ValueError: shape mismatches, unknown kind.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logp shape {tuple(logp.shape)}")
    if rewards.shape != (logp.shape[0],):
        raise ValueError(f"rewards must be [B]=[{logp.shape[0]}], got shape {tuple(rewards.shape)}")
    kl = kl_penalty(logp.detach(), ref_logp.detach(), kind)
    m = mask.to(kl.dtype)
    # where() rather than a bare multiply so NaN/inf log-probs at padded positions cannot leak through.
    seq_kl = torch.where(m > 0, kl * m, torch.zeros_like(kl)).sum(dim=-1)
    r = rewards.detach()
    if not r.is_floating_point():
        r = r.float()
    return r - beta * seq_kl.to(r.dtype)
