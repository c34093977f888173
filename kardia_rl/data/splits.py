"""Deterministic train/validation/test splits by dialogue (or by profile, as the paper's test set is
profile-disjoint). A dialogue never spans two splits: splitting happens before per-turn expansion.

Keys are ordered by a seeded hash of their content-derived id, and the first `round(n * fraction)`
go to test, then validation. Same seed -> same split, regardless of file order.
"""
from __future__ import annotations

from typing import Sequence

from kardia_rl.config.schema import SPLIT_UNITS
from kardia_rl.data.schema import Dialogue
from kardia_rl.utils.seeds import derive_seed


def _rank(key: str, seed: int) -> int:
    return derive_seed(seed, key, scheme="unit256")


def split_dialogues(dialogues: Sequence[Dialogue], val_fraction: float = 0.1, test_fraction: float = 0.0,
                    seed: int = 0, by: str = "dialogue") -> dict[str, list[Dialogue]]:
    """Return {"train", "validation", "test"} lists of dialogues."""
    if by not in SPLIT_UNITS:
        raise ValueError(f"split by must be one of {SPLIT_UNITS}, got {by!r}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"fractions must be in [0,1) and sum below 1: val={val_fraction} test={test_fraction}")
    key = (lambda d: d.id) if by == "dialogue" else (lambda d: d.anon_username)
    groups: dict[str, list[Dialogue]] = {}
    for d in dialogues:
        groups.setdefault(key(d), []).append(d)
    order = sorted(groups, key=lambda k: _rank(k, seed))
    n = len(dialogues)
    targets = [("test", round(n * test_fraction)), ("validation", round(n * val_fraction))]
    out: dict[str, list[Dialogue]] = {"train": [], "validation": [], "test": []}
    it = iter(order)
    for name, want in targets:
        while len(out[name]) < want:
            k = next(it, None)
            if k is None:
                break
            out[name].extend(groups[k])
    for k in it:
        out["train"].extend(groups[k])
    return out


def select_subset(samples: Sequence, max_samples: int, seed: int) -> list:
    """At most `max_samples` samples (0 = all): a seeded, content-hashed choice spread over all dialogues
    (not the first few dialogues' turns), the same for every model, kept in data order. Eval
    (eval.max_samples) and validation during GRPO (algo.val_samples, the same prompts every time) use it."""
    if max_samples <= 0 or max_samples >= len(samples):
        return list(samples)
    rank = sorted(range(len(samples)), key=lambda i: _rank(samples[i].id, seed))
    keep = set(rank[:max_samples])
    return [s for i, s in enumerate(samples) if i in keep]
