"""Pure-torch RL algorithm pieces of kardia-rl (advantages, KL estimators, policy loss, overlong handling).

Deliberately free of Ray/DeepSpeed/vLLM imports so the math can be imported by any worker (and tested on a
laptop) without dragging in the distributed stack.
"""
from .advantages import AdvantageResult, group_advantages
from .kl import KL_KINDS, apply_kl_to_rewards, kl_penalty
from .overlong import overlong_keep, overlong_penalty
from .policy_loss import entropy_from_logits, masked_mean, policy_loss

__all__ = [
    "KL_KINDS",
    "AdvantageResult",
    "apply_kl_to_rewards",
    "entropy_from_logits",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "overlong_keep",
    "overlong_penalty",
    "policy_loss",
]
