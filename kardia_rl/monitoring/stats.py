"""Batch statistics for logging: percentiles, None-safe means, and the rollout/judge metrics of one step.

Pure Python (no torch, no Ray) so the driver, the benchmarks and the tests can call it anywhere. The
key names follow the peers (OpenRLHF / verl / TRL): `rollout/reward_mean`, `rollout/frac_zero_std`,
`judge/<dimension>_mean`, `judge/latency_p50` ... The reward-hacking alerts (alerts.py) read these keys.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence

from kardia_rl.errors import KardiaError

#: Judge scores live on this scale; "normalised" scores are (s - 1) / 4 in [0, 1] (the paper's r_rubric).
SCORE_MIN, SCORE_MAX = 1.0, 5.0
#: Same tolerance as kardia_rl.algo.advantages.ZERO_STD_TOL (a test keeps them equal): a group whose reward
#: std is below it gives every member advantage 0, so it carries no learning signal.
ZERO_STD_TOL = 1e-8
#: vLLM / HF finish reason of an answer cut off by max_new_tokens.
LENGTH_FINISH = "length"


def _finite(values: Iterable[Any]) -> list[float]:
    """The numeric, finite members of `values` as floats (None / NaN / inf are skipped)."""
    out = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if math.isfinite(f):
            out.append(f)
    return out


def safe_mean(values: Iterable[Any]) -> Optional[float]:
    """Mean ignoring None and non-finite values; None when nothing is left (a metric that is absent this
    step, e.g. no judged candidate, must not be logged as 0)."""
    vals = _finite(values)
    return sum(vals) / len(vals) if vals else None


def sample_std(values: Iterable[Any]) -> Optional[float]:
    """Unbiased std (n - 1), as torch.std and the GRPO advantages use; 0.0 for one value, None for none."""
    vals = _finite(values)
    if not vals:
        return None
    if len(vals) == 1:
        return 0.0
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def percentile(values: Iterable[Any], q: float) -> Optional[float]:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default
    "linear" method), ignoring None; None for an empty input."""
    if not 0.0 <= q <= 100.0:
        raise KardiaError(f"percentile: q must be in [0, 100], got {q!r}")
    vals = sorted(_finite(values))
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def latency_metrics(latencies_s: Iterable[Any], prefix: str = "judge/") -> dict[str, float]:
    """`<prefix>latency_p50`, `_p95`, `_mean` (seconds) of per-request latencies; {} when there were none."""
    vals = _finite(latencies_s)
    if not vals:
        return {}
    return {f"{prefix}latency_p50": percentile(vals, 50), f"{prefix}latency_p95": percentile(vals, 95),
            f"{prefix}latency_mean": sum(vals) / len(vals)}


def groups(values: Sequence[Any], group_size: int) -> list[list[Any]]:
    """Split a flat batch (prompt-major: the N candidates of a prompt are contiguous) into groups of N."""
    if group_size < 1:
        raise KardiaError(f"group_size must be >= 1, got {group_size}")
    if len(values) % group_size:
        raise KardiaError(f"batch of {len(values)} is not a multiple of group_size={group_size}: the rollout "
                          f"batch must hold every prompt's {group_size} candidates")
    return [list(values[i:i + group_size]) for i in range(0, len(values), group_size)]


def mean_group_std(values: Sequence[Any], group_size: int) -> Optional[float]:
    """Mean over groups of the within-group std, skipping None members; groups with fewer than two values
    are skipped (no spread is measurable there). None when no group qualifies."""
    stds = []
    for g in groups(values, group_size):
        vals = _finite(g)
        if len(vals) >= 2:
            stds.append(sample_std(vals))
    return safe_mean(stds)


def normalise_score(score: Optional[float]) -> Optional[float]:
    """1-5 judge score -> [0, 1]; None stays None."""
    if score is None:
        return None
    return (float(score) - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)


def get_field(item: Any, key: str, default: Any = None) -> Any:
    """Read `key` from a dict or an attribute of a RewardBreakdown-like object."""
    if isinstance(item, Mapping):
        return item.get(key, default)
    return getattr(item, key, default)


def _judged(scores: Optional[Mapping]) -> bool:
    """A candidate was judged when at least one dimension has a score (malformed answers that the judge
    never saw, with judge.judge_malformed=false, have none)."""
    return bool(scores) and any(v is not None for v in scores.values())


def rollout_metrics(rewards: Sequence[Any], group_size: int, response_lengths: Sequence[Any],
                    finish_reasons: Optional[Sequence[Optional[str]]] = None,
                    dimensions: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Metrics of one rollout batch.

    Args:
        rewards: one RewardBreakdown-like dict (or object) per candidate, prompt-major, with keys `total`
            (unified reward), `format` (1 = well-formed; graded mode gives partial credit), `emotion`
            (1 = exact match; soft mode gives similarity), `rubric` (combined judge reward in [0, 1]) and
            `dims` ({dimension: 1-5 or None}).
        group_size: N candidates per prompt.
        response_lengths: generated tokens per candidate.
        finish_reasons: per candidate ("stop", "length", ...); `rollout/truncated_rate` is the share of
            "length". None: the key is left out.
        dimensions: rubric dimensions to report (default: every dimension seen in `dims`, sorted).

    Returns keys rollout/{reward_mean, reward_std, reward_min, reward_max, frac_zero_std, format_rate,
    format_reward_mean, emotion_acc, emotion_reward_mean, rubric_mean, response_len_mean,
    response_len_max, truncated_rate}, judge/<dim>_mean (1-5), judge/<dim>_group_std_mean (mean
    within-group std of the normalised [0, 1] score), judge/rubric_group_std_mean (same for the combined
    rubric reward, over judged candidates only so format failures scored 0 do not fake a spread), and
    judge/judged_frac. A key whose inputs are all missing (e.g. nobody was judged) is omitted, not 0.
    """
    n = len(rewards)
    if n == 0:
        raise KardiaError("rollout_metrics: empty rollout batch")
    if len(response_lengths) != n:
        raise KardiaError(f"rollout_metrics: {n} rewards but {len(response_lengths)} response lengths")
    if finish_reasons is not None and len(finish_reasons) != n:
        raise KardiaError(f"rollout_metrics: {n} rewards but {len(finish_reasons)} finish reasons")
    totals = [get_field(r, "total") for r in rewards]
    if any(t is None for t in totals):
        raise KardiaError("rollout_metrics: every candidate needs a `total` reward (got None)")
    groups(totals, group_size)  # validates the batch shape before any metric is computed

    out: dict[str, Optional[float]] = {}
    out["rollout/reward_mean"] = safe_mean(totals)
    out["rollout/reward_std"] = sample_std(totals)
    out["rollout/reward_min"] = min(float(t) for t in totals)
    out["rollout/reward_max"] = max(float(t) for t in totals)
    zero = [(sample_std(g) or 0.0) < ZERO_STD_TOL for g in groups(totals, group_size)]
    out["rollout/frac_zero_std"] = sum(zero) / len(zero)

    fmt = [get_field(r, "format") for r in rewards]
    # "valid" = full format credit; in graded mode partial answers count in the mean but not the rate.
    out["rollout/format_rate"] = safe_mean(None if f is None else float(float(f) >= 1.0 - 1e-9) for f in fmt)
    out["rollout/format_reward_mean"] = safe_mean(fmt)
    emo = [get_field(r, "emotion") for r in rewards]
    out["rollout/emotion_acc"] = safe_mean(None if e is None else float(float(e) >= 1.0 - 1e-9) for e in emo)
    out["rollout/emotion_reward_mean"] = safe_mean(emo)
    rubric = [get_field(r, "rubric") for r in rewards]
    out["rollout/rubric_mean"] = safe_mean(rubric)

    out["rollout/response_len_mean"] = safe_mean(response_lengths)
    out["rollout/response_len_max"] = max(_finite(response_lengths), default=None)
    if finish_reasons is not None:
        out["rollout/truncated_rate"] = sum(fr == LENGTH_FINISH for fr in finish_reasons) / n

    scores = [get_field(r, "dims") or {} for r in rewards]
    judged = [_judged(s) for s in scores]
    out["judge/judged_frac"] = sum(judged) / n
    dims = list(dimensions) if dimensions is not None else sorted({d for s in scores for d in s})
    for dim in dims:
        raw = [s.get(dim) for s in scores]
        out[f"judge/{dim}_mean"] = safe_mean(raw)
        out[f"judge/{dim}_group_std_mean"] = mean_group_std([normalise_score(v) for v in raw], group_size)
    out["judge/rubric_group_std_mean"] = mean_group_std(
        [rb if j else None for rb, j in zip(rubric, judged)], group_size)
    return {k: float(v) for k, v in out.items() if v is not None}
