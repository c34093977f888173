"""Least-loaded choice among actors: one rule for the rollout group and the judge pool."""
from __future__ import annotations

from typing import Collection, Sequence


def least_loaded(loads: Sequence[int], exclude: Collection[int] = ()) -> int:
    """Index of the smallest load outside `exclude` (among all when that leaves none); ties go to the lowest
    index, so equal loads fill actors in a fixed order."""
    live = [i for i in range(len(loads)) if i not in exclude] or list(range(len(loads)))
    return min(live, key=lambda i: (loads[i], i))
