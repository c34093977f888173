"""What to do with answers that hit the length limit (DAPO, Yu et al. 2025, section 3.4).

A truncated answer is cut mid-span, so the reward judges something the policy never finished; training on it
as-is teaches "long is fine" or "long is bad" depending on how the judge reads a fragment. Three choices:

* ``keep``: train on it with whatever reward it got;
* ``filter``: DAPO's overlong filtering: no loss on truncated answers (they still count in their group's
  mean/std, as in DAPO, so the siblings' advantages do not move);
* ``penalty``: DAPO's soft overlong punishment, added to the reward before the advantages::

      R_len(L) = 0                              if L <= L_max - buffer
               = (L_max - buffer - L) / buffer  if L_max - buffer < L <= L_max     (a ramp from 0 to -1)
               = -1                             if L > L_max

  scaled by ``penalty`` (the reward at the limit drops by that much). Generation stops at ``L_max``, so a
  truncated answer always gets the full ``-penalty``; an answer that ends just inside the buffer gets part.
  The ramp tells the policy that length is costly before the hard cut, instead of a cliff at ``L_max``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kardia_rl.config.schema import OVERLONG_MODES

__all__ = ["overlong_penalty", "overlong_keep"]


def overlong_penalty(lengths: Sequence[int] | torch.Tensor, max_len: int, buffer: int,
                     penalty: float = 1.0) -> torch.Tensor:
    """``penalty * R_len(L)`` per answer (<= 0), float32 ``[B]``; see the module docstring.

    Raises:
        ValueError: ``max_len < 1``, ``buffer`` outside ``[1, max_len]`` or ``penalty < 0``.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not 1 <= buffer <= max_len:
        raise ValueError(f"buffer must be in [1, max_len={max_len}] tokens, got {buffer}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    L = torch.as_tensor(lengths, dtype=torch.float32).reshape(-1)
    ramp = ((max_len - buffer) - L) / buffer
    return penalty * ramp.clamp(min=-1.0, max=0.0)


def overlong_keep(truncated: Sequence[bool] | torch.Tensor, mode: str) -> torch.Tensor:
    """Bool ``[B]``: False for truncated answers under ``filter``, True everywhere otherwise."""
    if mode not in OVERLONG_MODES:
        raise ValueError(f"unknown overlong mode {mode!r}; expected one of {OVERLONG_MODES}")
    t = torch.as_tensor(truncated, dtype=torch.bool).reshape(-1)
    return ~t if mode == "filter" else torch.ones_like(t)
