"""Fitting a calibration head (pure numpy/scipy, no Ray): the pairwise model, its regularisation, the fixed split.

The model (one per rubric dimension): a linear score s = w . standardise(x) on the feature recipe of
rewards/judge/calibration.py, fitted with a pairwise logistic (RankNet) loss over every pair of training items of
the SAME set whose human levels differ: loss = sum over pairs (hi, lo) of weight * log(1 + exp(-(s_hi - s_lo))),
plus lam * |w|^2. Why pairwise and not ordinal/regression:
- the judge is used to RANK a group's candidates (GRPO advantages are within-group), and pairwise accuracy is
  the target metric: the loss is its smooth surrogate;
- the sets' scales differ (EPITOME sums three 0-2 levels into 0-6, ESConv's seekers rate 1-5 and mostly 5): a
  pairwise loss only compares items of one set, so sets fit jointly without pretending their scales agree;
- a pair's weight is its level gap, so confident orderings (0 vs 6) count more than near-ties (2 vs 3).
Each set's pairs sum to a set weight proportional to (its training items) ** p. p = 0 weighs the sets equally;
p > 0 trusts the larger set more, which matters when the sets are unequally noisy (ESConv's conversation-level
ratings are far noisier than EPITOME's per-reply ones). lam and p are chosen TOGETHER by K-fold cross-validation
over contexts of the training part only, on the mean of the per-set pairwise accuracies (each set counts the
same in the criterion whatever p is), so the choice never sees the held-out part.
Every pair of a set is used up to MAX_PAIRS, above that a fixed seeded sample, so the fit is deterministic.

The split is fixed: an item is held out when sha256(f"{seed}:{context_id}") falls in the lowest `test_fraction`
of the hash range, so every response to one context lands on the same side, and the split does not depend on
the file's order, on --limit or on the other sets.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy.optimize import minimize

from kardia_rl.utils.seeds import derive_seed

SPLIT_SEED = 0
TEST_FRACTION = 0.2
LAMBDAS = (100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0)  # L2 strengths tried by cross-validation
SET_POWERS = (0.0, 1.0, 2.0)  # set weight ~ (training items) ** p, tried by cross-validation with the L2 strength
CV_FOLDS = 4
MAX_PAIRS = 200_000  # training pairs per set (EPITOME's 2,400 training items have ~2.2M; a fixed sample)
PAIR_SEED = 0


def is_held_out(context_id: str, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> bool:
    return derive_seed(seed, context_id, scheme="colon64") / 2.0 ** 64 < test_fraction


def _fold(context_id: str, folds: int) -> int:
    return derive_seed("cv", context_id, scheme="colon64") % folds


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    return mean, np.where(scale > 1e-8, scale, 1.0)


def set_weights(set_ids: np.ndarray, power: float) -> dict:
    """{set id: its pairs' total weight}: proportional to (items of the set) ** power, summing to 1."""
    sets, counts = np.unique(set_ids, return_counts=True)
    raw = counts.astype(np.float64) ** power
    return {int(k): float(v) for k, v in zip(sets, raw / raw.sum())}


def _pairs(y: np.ndarray, set_ids: np.ndarray, max_pairs: int = MAX_PAIRS, power: float = 0.0) -> tuple:
    """(hi, lo, weight) index arrays of the training pairs: within each set, every pair with y[hi] > y[lo], or a
    fixed random sample of `max_pairs` of them (seeded: the fit stays deterministic); weight = gap, normalised so
    each set's pairs sum to its set weight (set_weights)."""
    rng = np.random.default_rng(PAIR_SEED)
    share = set_weights(set_ids, power)
    his, los, ws = [], [], []
    for s in np.unique(set_ids):
        idx = np.flatnonzero(set_ids == s)
        hi, lo = np.nonzero(y[idx][:, None] > y[idx][None, :])
        if len(hi) > max_pairs:
            keep = np.sort(rng.choice(len(hi), max_pairs, replace=False))
            hi, lo = hi[keep], lo[keep]
        if len(hi):
            w = y[idx][hi] - y[idx][lo]
            his.append(idx[hi]), los.append(idx[lo]), ws.append(share[int(s)] * w / w.sum())
    if not his:
        raise ValueError("no pair of items with different human levels to learn from")
    return np.concatenate(his), np.concatenate(los), np.concatenate(ws)


def fit_pairwise(z: np.ndarray, y: np.ndarray, set_ids: np.ndarray, lam: float, power: float = 0.0) -> np.ndarray:
    """Weights w minimising the gap-weighted pairwise logistic loss (each set's pairs weighing its set weight, all
    of them 1) plus lam * 1e-4 * |w|^2; `z` are standardised features."""
    hi, lo, pw = _pairs(y, set_ids, power=power)
    reg, n = lam * 1e-4, len(z)

    def loss_grad(w: np.ndarray):
        s = z @ w
        m = s[hi] - s[lo]
        g = -pw / (1.0 + np.exp(np.clip(m, -50, 50)))  # d loss / d margin
        gs = np.bincount(hi, g, n) - np.bincount(lo, g, n)
        return float(pw @ np.logaddexp(0.0, -m)) + reg * w @ w, z.T @ gs + 2 * reg * w

    res = minimize(loss_grad, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B",
                   options={"maxiter": 300, "gtol": 1e-6})
    return res.x


def pair_accuracy(score: np.ndarray, y: np.ndarray, min_gap: float = 1e-9) -> Optional[float]:
    """Share of pairs with y gap >= min_gap ordered like y (ties half): the CV criterion (judge-validate's
    human_metrics.pairwise_accuracy is the reported one)."""
    dy = y[:, None] - y[None, :]
    ds = score[:, None] - score[None, :]
    m = dy >= min_gap
    n = m.sum()
    return None if n == 0 else float(((ds[m] > 0).sum() + 0.5 * (ds[m] == 0).sum()) / n)


def choose_hyper(x: np.ndarray, y: np.ndarray, set_ids: np.ndarray, context_ids: Sequence[str],
                 lambdas: Sequence[float] = LAMBDAS, powers: Sequence[float] = SET_POWERS,
                 folds: int = CV_FOLDS) -> tuple[float, float, dict]:
    """(L2 strength, set power, table) with the best mean within-set pairwise accuracy over K folds of contexts
    (one set: the power changes nothing and only p = 0 is tried). Ties go to the stronger L2, then the smaller p."""
    fold = np.array([_fold(c, folds) for c in context_ids])
    if len(np.unique(set_ids)) < 2:
        powers = (0.0,)
    table = {}
    for power in powers:
        for lam in lambdas:
            accs = []
            for k in range(folds):
                tr, te = fold != k, fold == k
                if tr.sum() < 4 or te.sum() < 2:
                    continue
                mean, scale = standardiser(x[tr])
                w = fit_pairwise((x[tr] - mean) / scale, y[tr], set_ids[tr], lam, power)
                s = ((x[te] - mean) / scale) @ w
                for sid in np.unique(set_ids[te]):
                    m = set_ids[te] == sid
                    a = pair_accuracy(s[m], y[te][m])
                    if a is not None:
                        accs.append(a)
            table[(lam, power)] = float(np.mean(accs)) if accs else float("nan")
    lam, power = max(table, key=lambda k: (np.nan_to_num(table[k], nan=-1.0), k[0], -k[1]))
    return lam, power, table


def fit_dimension(x: np.ndarray, y: np.ndarray, set_ids: np.ndarray, context_ids: Sequence[str],
                  lam: Optional[float] = None, power: float = 0.0) -> dict:
    """{mean, scale, weights, mid, spread, lam, power, cv} of one dimension (lam and power by CV unless lam is
    given)."""
    cv = {}
    if lam is None:
        lam, power, cv = choose_hyper(x, y, set_ids, context_ids)
    mean, scale = standardiser(x)
    w = fit_pairwise((x - mean) / scale, y, set_ids, lam, power)
    raw = ((x - mean) / scale) @ w
    q10, q50, q90 = np.percentile(raw, [10, 50, 90])
    spread = max(float(q90 - q10) / 4.4, 1e-6)  # logistic(+-2.2) = 0.1 / 0.9: the 10-90% range -> ~1.4-4.6
    return {"mean": mean, "scale": scale, "weights": w, "mid": float(q50), "spread": spread, "lam": lam,
            "power": power, "cv": {f"l2={k[0]:g},p={k[1]:g}": round(v, 4) for k, v in cv.items()}}
