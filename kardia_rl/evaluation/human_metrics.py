"""Agreement of one judge with human levels (pure: numpy and scipy, no Ray): what `judge-validate` reports.

Per rubric dimension, over the items with both a human level and a judge score:
- pairwise accuracy: over pairs whose human levels differ (by at least `min_gap`), the share in which the judge
  scores the higher-rated response higher, a judge tie counting one half. Pairs are taken WITHIN a context when
  the data has several responses per context (`pair_mode`: "within" when at least half of the items share their
  context_id with another item), otherwise over ALL pairs of items. 0.5 is chance;
- the tie rate: the share of those pairs the judge scores equal (a judge that ties everything sits at 0.5
  accuracy and tie rate 1);
- Spearman's rho between judge scores and human levels (scipy), and the quadratic-weighted kappa
  (evaluation/agreement.py's) after mapping the judge's 1-5 score linearly onto the human scale [lo, hi] and
  rounding both half up to integer levels;
- bootstrap 95% intervals (percentiles of `n_boot` resamples with a fixed seed, so a run is reproducible):
  items are resampled for rho and kappa, and for all-pairs accuracy; contexts are resampled for within-context
  accuracy (pairs inside one context are not independent).

All-pairs counting is O(K^2 n log n) for K distinct human levels (sorted judge scores per level, weighted
counts), so a bootstrap over a few thousand items takes seconds, not the hours of an O(n^2) loop per resample.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from kardia_rl.evaluation.agreement import quadratic_weighted_kappa, spearman, to_rating

N_BOOT = 1000
BOOT_SEED = 0


def pair_mode(context_ids: Sequence[str]) -> str:
    """"within" when at least half of the items share their context with another item, else "all"."""
    counts: dict[str, int] = defaultdict(int)
    for c in context_ids:
        counts[c] += 1
    shared = sum(n for n in counts.values() if n > 1)
    return "within" if context_ids and shared * 2 >= len(context_ids) else "all"


def _all_pairs_counts(human: np.ndarray, judge: np.ndarray, weights: np.ndarray, min_gap: float
                      ) -> tuple[float, float, float]:
    """(weighted wins + ties/2, weighted ties, weighted pairs) over all pairs with human gap >= min_gap (> 0)."""
    levels = np.unique(human)
    per = []
    for lv in levels:
        m = human == lv
        order = np.argsort(judge[m], kind="stable")
        s, w = judge[m][order], weights[m][order]
        per.append((s, w, np.concatenate([[0.0], np.cumsum(w)])))
    wins = ties = total = 0.0
    for i, lo in enumerate(levels):
        s_lo, _, cum_lo = per[i]
        for j in range(i + 1, len(levels)):
            if levels[j] - lo < max(min_gap, 1e-12):
                continue
            s_hi, w_hi, _ = per[j]
            below = cum_lo[np.searchsorted(s_lo, s_hi, side="left")]
            upto = cum_lo[np.searchsorted(s_lo, s_hi, side="right")]
            wins += float(w_hi @ below)
            ties += float(w_hi @ (upto - below))
            total += float(w_hi.sum() * cum_lo[-1])
    return wins + ties / 2, ties, total


def _context_pair_counts(human: np.ndarray, judge: np.ndarray, groups: list[np.ndarray], min_gap: float
                         ) -> np.ndarray:
    """Per context: [wins + ties/2, ties, pairs] over its pairs with human gap >= min_gap (> 0)."""
    out = np.zeros((len(groups), 3))
    gap = max(min_gap, 1e-12)
    for g, idx in enumerate(groups):
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if abs(human[i] - human[j]) < gap:
                    continue
                hi, lo = (i, j) if human[i] > human[j] else (j, i)
                tie = judge[hi] == judge[lo]
                out[g] += (1.0 if judge[hi] > judge[lo] else 0.5 if tie else 0.0, float(tie), 1.0)
    return out


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den > 0 else None


def _interval(values: list) -> Optional[list]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if len(vals) < 2:
        return None
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def pairwise_accuracy(human: Sequence[float], judge: Sequence[float], context_ids: Optional[Sequence[str]] = None,
                      *, min_gap: float = 0.0, mode: Optional[str] = None, n_boot: int = N_BOOT,
                      seed: int = BOOT_SEED) -> dict:
    """{"mode", "min_gap", "n_pairs", "accuracy", "accuracy_ci", "tie_rate"} (see the module docstring)."""
    h, s = np.asarray(human, dtype=float), np.asarray(judge, dtype=float)
    cids = list(context_ids) if context_ids is not None else [str(i) for i in range(len(h))]
    mode = mode or pair_mode(cids)
    rng = np.random.default_rng(seed)
    if mode == "within":
        by: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(cids):
            by[c].append(i)
        counts = _context_pair_counts(h, s, [np.array(v) for v in by.values() if len(v) > 1], min_gap)
        score, ties, total = counts.sum(axis=0) if len(counts) else (0.0, 0.0, 0.0)
        boots = []
        for _ in range(n_boot if total > 0 else 0):
            w = np.bincount(rng.integers(0, len(counts), len(counts)), minlength=len(counts))
            b = w @ counts
            boots.append(_ratio(b[0], b[2]))
    elif mode == "all":
        score, ties, total = _all_pairs_counts(h, s, np.ones(len(h)), min_gap)
        boots = []
        for _ in range(n_boot if total > 0 else 0):
            w = np.bincount(rng.integers(0, len(h), len(h)), minlength=len(h)).astype(float)
            b = _all_pairs_counts(h, s, w, min_gap)
            boots.append(_ratio(b[0], b[2]))
    else:
        raise ValueError(f"pair mode {mode!r}: expected 'within' or 'all'")
    return {"mode": mode, "min_gap": min_gap, "n_pairs": int(total), "accuracy": _ratio(score, total),
            "accuracy_ci": _interval(boots), "tie_rate": _ratio(ties, total)}


def to_level(score: float, lo: float, hi: float) -> int:
    """A judge's 1-5 score mapped linearly onto the human scale [lo, hi], rounded half up to an integer level."""
    return to_rating(lo + (float(score) - 1.0) / 4.0 * (hi - lo), int(math.floor(lo)), int(math.ceil(hi)))


def kappa_vs_human(human: Sequence[float], judge: Sequence[float], lo: float, hi: float) -> Optional[float]:
    """Quadratic-weighted kappa of the judge's mapped levels against the human levels (rounded half up)."""
    ilo, ihi = int(math.floor(lo)), int(math.ceil(hi))
    if ihi <= ilo:
        return None
    return quadratic_weighted_kappa([to_rating(x, ilo, ihi) for x in human], [to_level(y, lo, hi) for y in judge],
                                    ilo, ihi)


def agreement_with_humans(human: Sequence[float], judge: Sequence[float], context_ids: Sequence[str],
                          scale: tuple[float, float], *, min_gaps: Sequence[float] = (0.0,), n_boot: int = N_BOOT,
                          seed: int = BOOT_SEED) -> dict:
    """Every metric of one dimension, with bootstrap intervals (items with a None judge score are left out)."""
    keep = [i for i, y in enumerate(judge) if y is not None]
    h = [float(human[i]) for i in keep]
    s = [float(judge[i]) for i in keep]
    c = [context_ids[i] for i in keep]
    lo, hi = scale
    ilo, ihi = int(math.floor(lo)), int(math.ceil(hi))
    hr, sr = [to_rating(x, ilo, ihi) for x in h], [to_level(y, lo, hi) for y in s]  # mapped once, resampled below
    rho, p = spearman(s, h)
    kappa = quadratic_weighted_kappa(hr, sr, ilo, ihi) if h and ihi > ilo else None
    rng = np.random.default_rng(seed)
    rhos, kappas = [], []
    for _ in range(n_boot if len(h) > 1 else 0):
        idx = rng.integers(0, len(h), len(h))
        rhos.append(spearman([s[i] for i in idx], [h[i] for i in idx])[0])
        if ihi > ilo:
            kappas.append(quadratic_weighted_kappa([hr[i] for i in idx], [sr[i] for i in idx], ilo, ihi))
    return {"n_items": len(h), "unscored": len(judge) - len(keep), "scale": [lo, hi],
            "pairwise": [pairwise_accuracy(h, s, c, min_gap=g, n_boot=n_boot, seed=seed) for g in min_gaps],
            "spearman": rho, "spearman_p": p, "spearman_ci": _interval(rhos),
            "kappa": kappa, "kappa_ci": _interval(kappas),
            "judge_mean": float(np.mean(s)) if s else None, "human_mean": float(np.mean(h)) if h else None}
