"""Judge reliability: how well several rubric judges (or one judge under several seeds) agree.

The paper's own open question is whether its LLM judge is biased or unstable; this module makes that
measurable. The same answers are scored by every judge (through UnifiedReward, so every judge sees exactly
the requests training would send: the response span only, the visible history), and for every pair of
judges and every rubric dimension we report, over the answers BOTH judges scored:
- Spearman's rho on the raw scores (scipy.stats.spearmanr), with its p-value;
- Cohen's kappa with quadratic weights on the 1-5 scale (scores rounded half up to integers first), the
  usual agreement statistic for ordinal ratings: 1 = identical, 0 = chance level, < 0 = systematic
  disagreement;
- the exact-agreement rate of the rounded ratings and the mean absolute difference of the raw scores
  (both always defined, unlike rho and kappa, which are undefined when a judge gives one constant rating).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from kardia_rl.errors import ConfigError, KardiaError
from kardia_rl.rewards.judge.base import DIMENSIONS

MIN_RATING, MAX_RATING = 1, 5


# ------------------------------------------------------------------------------------- statistics
def to_rating(x: float, lo: int = MIN_RATING, hi: int = MAX_RATING) -> int:
    """Round half up (2.5 -> 3, unlike Python's banker's rounding) and clip into [lo, hi]."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"rating {x!r} is not a finite number")
    return min(hi, max(lo, math.floor(x + 0.5)))


def quadratic_weighted_kappa(a: Sequence[int], b: Sequence[int], lo: int = MIN_RATING,
                             hi: int = MAX_RATING) -> Optional[float]:
    """Cohen's kappa with quadratic weights for two raters' integer ratings in [lo, hi].

    kappa = 1 - sum_ij w_ij O_ij / sum_ij w_ij E_ij, with O the observed confusion matrix (counts),
    E = outer(row totals, column totals) / n the matrix expected by chance and w_ij = (i - j)^2 / (K - 1)^2.
    None (undefined) when the chance disagreement is 0, i.e. both raters use one and the same rating.
    """
    if len(a) != len(b):
        raise ValueError(f"kappa: {len(a)} ratings vs {len(b)} ratings")
    if not a:
        return None
    k = hi - lo + 1
    observed = [[0] * k for _ in range(k)]
    for x, y in zip(a, b):
        if x != int(x) or y != int(y) or not (lo <= x <= hi and lo <= y <= hi):
            raise ValueError(f"kappa: ratings must be integers in [{lo}, {hi}], got {x!r} and {y!r}")
        observed[int(x) - lo][int(y) - lo] += 1
    n = len(a)
    rows = [sum(r) for r in observed]
    cols = [sum(observed[i][j] for i in range(k)) for j in range(k)]
    num = den = 0.0
    for i in range(k):
        for j in range(k):
            w = (i - j) ** 2 / (k - 1) ** 2
            num += w * observed[i][j]
            den += w * rows[i] * cols[j] / n
    return None if den == 0 else 1.0 - num / den


def spearman(a: Sequence[float], b: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """(rho, two-sided p) via scipy; (None, None) when undefined (fewer than 2 pairs or a constant side)."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values vs {len(b)} values")
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None, None
    from scipy.stats import spearmanr

    res = spearmanr(a, b)
    rho, p = float(res.statistic), float(res.pvalue)
    return (rho if math.isfinite(rho) else None), (p if math.isfinite(p) else None)


def dimension_agreement(xa: Sequence[Optional[float]], xb: Sequence[Optional[float]]) -> dict:
    """Agreement of two judges on one dimension over the items both scored (None = not scored)."""
    pairs = [(float(x), float(y)) for x, y in zip(xa, xb) if x is not None and y is not None]
    ra = [to_rating(x) for x, _ in pairs]
    rb = [to_rating(y) for _, y in pairs]
    rho, p = spearman([x for x, _ in pairs], [y for _, y in pairs])
    n = len(pairs)
    return {"n": n, "spearman": rho, "spearman_p": p, "kappa": quadratic_weighted_kappa(ra, rb),
            "exact_agreement": sum(x == y for x, y in zip(ra, rb)) / n if n else None,
            "mean_abs_diff": sum(abs(x - y) for x, y in pairs) / n if n else None}


def _mean_defined(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------------------------------- judges
@dataclass
class JudgeSpec:
    """One judge of the comparison: a backend, judge.* config overrides and the judge seed."""
    name: str
    backend: str
    overrides: list  # "judge.key=value" strings
    seed: int


def parse_judge_spec(spec: str) -> tuple[str, list[str], Optional[int]]:
    """`backend` or `backend:key=value,key=value` -> (backend, ["judge.key=value", ...], seed or None).

    Keys are judge config keys (model, temperature, group_wise, ...) plus `seed` (the judge's seed)."""
    backend, _, rest = spec.partition(":")
    backend = backend.strip()
    if not backend:
        raise ConfigError(f"--judges {spec!r}: expected BACKEND or BACKEND:key=value,...")
    overrides, seed = [], None
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--judges {spec!r}: {item!r} is not key=value")
        key = key.strip()
        if key == "seed":
            try:
                seed = int(value)
            except ValueError:
                raise ConfigError(f"--judges {spec!r}: seed must be an integer, got {value!r}") from None
        elif key == "backend":
            raise ConfigError(f"--judges {spec!r}: give the backend before the colon, not as a key")
        else:
            overrides.append(f"judge.{key}={value}")
    return backend, overrides, seed


def expand_judge_specs(specs: Sequence[str], seeds: Sequence[int], default_seed: int) -> list[JudgeSpec]:
    """Every spec under every seed of --seeds (a spec's own seed=... wins); unique display names."""
    out: list[JudgeSpec] = []
    for spec in specs:
        backend, overrides, own_seed = parse_judge_spec(spec)
        for s in ([own_seed] if own_seed is not None else (list(seeds) or [default_seed])):
            name = spec if (own_seed is not None or len(seeds) <= 1) else f"{spec}@seed={s}"
            out.append(JudgeSpec(name, backend, overrides, int(s)))
    seen: dict[str, int] = {}
    for j in out:  # the same spec twice (e.g. to test a judge against itself) gets #2, #3 ...
        seen[j.name] = seen.get(j.name, 0) + 1
        if seen[j.name] > 1:
            j.name = f"{j.name}#{seen[j.name]}"
    if len(out) < 2:
        raise KardiaError(f"judge agreement needs at least two judges: got --judges {list(specs)} and --seeds "
                          f"{list(seeds)}; give two judges or one judge with two seeds")
    return out


def score_with_judges(cfgs: Mapping[str, object], judges: Mapping[str, object], samples: Sequence,
                      completions: Sequence[str], group_ids: Optional[Sequence[str]] = None, *,
                      progress: bool = True) -> dict[str, list]:
    """name -> RewardBreakdowns of `completions` under that judge (cfgs[name] gives its judge/data config).

    The reward weights are forced to rubric only (format 0, emotion 0, rubric 1) so every judge is asked
    whatever the run's weights are; malformed answers are judged only under judge.judge_malformed."""
    from kardia_rl.rewards import UnifiedReward
    from kardia_rl.rewards.offline import score_chunked

    out = {}
    for name, judge in judges.items():
        cfg = cfgs[name]
        rubric_only = dataclasses.replace(cfg.reward, format_weight=0.0, emotion_weight=0.0, rubric_weight=1.0)
        reward = UnifiedReward.from_config(cfg, judge, rubric_only)
        gids = list(group_ids) if group_ids is not None else [getattr(s, "id", str(i)) for i, s in enumerate(samples)]
        out[name] = score_chunked(reward, list(samples), list(completions), gids, progress=progress,
                                  desc=f"judge [{name}]")
    return out


def agreement_report(breakdowns: Mapping[str, Sequence], meta: Optional[Mapping[str, dict]] = None) -> dict:
    """Per-judge summaries and, for every pair (in the given order), per-dimension agreement."""
    names = list(breakdowns)
    lengths = {len(v) for v in breakdowns.values()}
    if len(lengths) != 1:
        raise ValueError(f"judges scored different numbers of answers: { {n: len(v) for n, v in breakdowns.items()} }")
    judges = {}
    for name in names:
        bs = breakdowns[name]
        dims_mean = {d: _mean_defined([b.dims.get(d) for b in bs]) for d in DIMENSIONS}
        judges[name] = {**(meta or {}).get(name, {}), "judged": sum(b.judged for b in bs),
                        "failures": sum(b.judge_failed for b in bs), "fallbacks": sum(b.fallback for b in bs),
                        "dims_mean": dims_mean}
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            dims = {d: dimension_agreement([x.dims.get(d) for x in breakdowns[a]], [y.dims.get(d) for y in breakdowns[b]])
                    for d in DIMENSIONS}
            pairs.append({"a": a, "b": b, "dims": dims, "kappa_mean": _mean_defined(v["kappa"] for v in dims.values()),
                          "spearman_mean": _mean_defined(v["spearman"] for v in dims.values())})
    return {"judges": judges, "pairs": pairs}
