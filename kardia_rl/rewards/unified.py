"""The unified reward of Kardia-R1: r = lambda_f * format + lambda_e * emotion + lambda_r * rubric.

Contract (TRL-style): `score(samples, completions, group_ids)` sees the samples' dataset columns (person,
situation, history, emotion; TurnSample objects or plain dicts) and the raw completions, and returns one
`RewardBreakdown` per completion with every component and every rubric dimension separately, for logging
and for the reward-hacking monitors.

Rules:
- Emotion credit only from an emotion span the parser accepts under reward.format_mode (strict: the whole
  answer well-formed; graded: the emotion span itself well-formed); a bare label earns nothing
  (`emotion_reward.credited_emotion`).
- A malformed answer (strict parser fails) gets no judge call and rubric 0, unless
  `judge.judge_malformed` is set; then the judge sees its response span if one was closed, else the whole
  text with span tags removed.
- The judge sees ONLY the response span (never the understanding/reasoning/emotion spans, which could
  argue for their own score) plus the profile, situation and the visible history (past assistant turns
  reduced to what the user saw).
- With `reward.rubric_weight == 0` the judge is not called at all (rubric 0, judged False).
- A failed judgment (timeout, unparseable after retries, backend error, a judge that raises) gets the
  configured fallback and is counted; it never silently becomes 0 under "neutral":
    neutral  - the mean rubric of the successfully judged members of the same group, so the failed member
               has exactly the group's mean and adds no advantage signal; if no member succeeded, 0.5 for
               all (still no signal within the group);
    zero     - 0.0 (punishes; only sensible when failures are the candidate's fault);
    midpoint - 0.5.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from kardia_rl.config.schema import JUDGE_FALLBACKS
from kardia_rl.data.emotions import EMOTIONS_32, label_set
from kardia_rl.errors import DataError
from kardia_rl.format.prompt import crop_history, visible_history
from kardia_rl.format.spans import parse_spans, visible_response
from kardia_rl.monitoring.stats import percentile
from kardia_rl.rewards.emotion_reward import credited_emotion, emotion_score
from kardia_rl.rewards.format_reward import format_score
from kardia_rl.rewards.judge.base import (
    DIMENSIONS, JudgeBackend, Judgment, JudgeRequest, aggregate_scores, failed_judgment,
)

log = logging.getLogger(__name__)
NEUTRAL_IF_NONE = 0.5


@dataclass
class RewardBreakdown:
    total: float
    format: float
    emotion: float
    rubric: float
    dims: dict = field(default_factory=dict)  # dimension -> 1-5 score, None when not judged / failed
    rationale: dict = field(default_factory=dict)
    judged: bool = False  # the judge was asked (a cache hit counts)
    judge_failed: bool = False
    fallback: bool = False  # rubric came from the fallback policy
    predicted_emotion: Optional[str] = None
    parse_error: Optional[str] = None  # why the answer is malformed (None when well-formed)
    judge_error: Optional[str] = None
    cached: bool = False
    response: str = ""  # the response text the judge saw

    def as_dict(self) -> dict:
        return asdict(self)


def _col(sample: Any, name: str, default: Any = None) -> Any:
    if isinstance(sample, dict):
        return sample.get(name, default)
    return getattr(sample, name, default)


def summary(breakdowns: Sequence[RewardBreakdown]) -> dict:
    """Means for logging: reward/<component>_mean, judge/<dimension>_mean (over successful judgments; absent
    when there were none), rates of malformed answers, judged answers, failures and fallbacks."""
    n = len(breakdowns)
    if n == 0:
        return {}
    out = {f"reward/{c}_mean": sum(getattr(b, c) for b in breakdowns) / n
           for c in ("total", "format", "emotion", "rubric")}
    out["reward/total_std"] = statistics.pstdev([b.total for b in breakdowns]) if n > 1 else 0.0
    out["reward/malformed_rate"] = sum(b.parse_error is not None for b in breakdowns) / n
    judged = [b for b in breakdowns if b.judged]
    out["judge/judged_rate"] = len(judged) / n
    out["judge/failure_rate"] = (sum(b.judge_failed for b in judged) / len(judged)) if judged else 0.0
    out["judge/fallback_rate"] = sum(b.fallback for b in breakdowns) / n
    for d in DIMENSIONS:
        vals = [b.dims[d] for b in breakdowns if b.dims.get(d) is not None]
        if vals:  # omitted (not NaN) when nothing was judged, so NaN guards on metrics never trip on it
            out[f"judge/{d}_mean"] = sum(vals) / len(vals)
    return out


class UnifiedReward:
    def __init__(self, cfg_reward, cfg_judge, judge: JudgeBackend, labels: Optional[Sequence[str]] = None,
                 notation: str = "kardia", *, history_mode: str = "response", max_history_turns: int = 0):
        self.wf, self.we, self.wr = cfg_reward.format_weight, cfg_reward.emotion_weight, cfg_reward.rubric_weight
        self.format_mode, self.emotion_mode = cfg_reward.format_mode, cfg_reward.emotion_mode
        self.fallback = cfg_judge.fallback
        if self.fallback not in JUDGE_FALLBACKS:
            raise ValueError(f"judge.fallback: {self.fallback!r} is not one of {list(JUDGE_FALLBACKS)}")
        self.judge_malformed = bool(cfg_judge.judge_malformed)
        self.dim_weights = dict(cfg_judge.dimension_weights)
        self.judge = judge
        self.labels = label_set(labels) if labels else EMOTIONS_32
        self.notation, self.history_mode, self.max_history_turns = notation, history_mode, max_history_turns
        self.reset_stats()

    @classmethod
    def from_config(cls, cfg, judge: Optional[JudgeBackend] = None, cfg_reward=None) -> "UnifiedReward":
        """The reward of a whole KardiaConfig, as training, eval, split, score and judge agreement all build it.
        `judge` defaults to make_judge(cfg.judge, seed=cfg.seed) (the caller closes it: `reward.judge`);
        `cfg_reward` replaces cfg.reward (judge agreement asks for rubric only)."""
        if judge is None:
            from kardia_rl.rewards.judge import make_judge

            judge = make_judge(cfg.judge, seed=cfg.seed)
        return cls(cfg_reward or cfg.reward, cfg.judge, judge, label_set(cfg.data.emotion_labels or None),
                   cfg.data.span_notation, history_mode=cfg.data.history,
                   max_history_turns=cfg.data.max_history_turns)

    def reset_stats(self) -> None:
        # judge_calls = requests sent to the judge (cache hits included); latencies = the recent window of
        # per-request judge latencies in seconds (bounded: training runs for days)
        self.stats: dict = {"judge_calls": 0, "judge_failures": 0, "fallbacks": 0, "cache_hits": 0,
                            "malformed_skipped": 0, "latencies": deque(maxlen=10000)}

    def stats_summary(self) -> dict:
        s = self.stats
        lat = list(s["latencies"])
        return {"judge/calls": s["judge_calls"], "judge/failures": s["judge_failures"],
                "judge/fallbacks": s["fallbacks"], "judge/malformed_skipped": s["malformed_skipped"],
                "judge/cache_hit_rate": s["cache_hits"] / s["judge_calls"] if s["judge_calls"] else 0.0,
                "judge/latency_p50": percentile(lat, 50) if lat else 0.0,
                "judge/latency_p95": percentile(lat, 95) if lat else 0.0}

    def _request(self, sample: Any, response: str, group_id: str) -> JudgeRequest:
        missing = [k for k in ("person", "situation", "history") if _col(sample, k) is None]
        if missing:
            raise DataError(f"sample {_col(sample, 'id', '?')!r}: missing column(s) {missing} needed by the judge")
        hist = [m for m in _col(sample, "history") if m.get("role") in ("user", "assistant")]
        hist = crop_history(hist, self.max_history_turns)
        hist = visible_history(hist, self.history_mode, self.notation)
        return JudgeRequest(person=str(_col(sample, "person")), situation=str(_col(sample, "situation")),
                            history=tuple((m["role"], m["content"]) for m in hist), response=response,
                            group_id=str(group_id))

    async def _run_judge(self, requests: list[JudgeRequest]) -> list[Judgment]:
        try:
            res = list(await self.judge.judge(requests))
            if len(res) != len(requests):
                raise RuntimeError(f"judge returned {len(res)} judgments for {len(requests)} requests")
            return res
        except Exception as e:  # noqa: BLE001 - a judge that breaks its contract still must not stop training
            log.exception("judge backend raised; every request of this batch falls back")
            return [failed_judgment(f"judge raised {type(e).__name__}: {e}") for _ in requests]

    async def score(self, samples: Sequence[Any], completions: Sequence[str],
                    group_ids: Optional[Sequence[Any]] = None) -> list[RewardBreakdown]:
        if len(samples) != len(completions):
            raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
        if group_ids is None:
            group_ids = [_col(s, "id", f"#{i}") for i, s in enumerate(samples)]
        if len(group_ids) != len(samples):
            raise ValueError(f"{len(group_ids)} group ids for {len(samples)} samples")
        out: list[RewardBreakdown] = []
        to_judge: list[int] = []
        requests: list[JudgeRequest] = []
        for i, (s, text) in enumerate(zip(samples, completions)):
            text = text if isinstance(text, str) else ""
            res = parse_spans(text, self.notation)
            pred = credited_emotion(res, self.labels, self.format_mode)  # same parse, same mode as format
            b = RewardBreakdown(total=0.0, format=format_score(res, self.format_mode),
                                emotion=emotion_score(pred, _col(s, "emotion"), self.emotion_mode, self.labels),
                                rubric=0.0, dims={d: None for d in DIMENSIONS}, predicted_emotion=pred,
                                parse_error=None if res.ok else res.reason)
            if res.ok:
                response = res.spans.response
            elif self.judge_malformed:
                response = visible_response(res, text)
            else:
                response = ""
                self.stats["malformed_skipped"] += 1
            b.response = response
            if response and self.wr > 0:
                to_judge.append(i)
                requests.append(self._request(s, response, group_ids[i]))
            out.append(b)
        judgments = await self._run_judge(requests) if requests else []
        self.stats["judge_calls"] += len(requests)
        for i, j in zip(to_judge, judgments):
            b = out[i]
            b.judged, b.cached, b.rationale = True, bool(j.cached), dict(j.rationale or {})
            value = aggregate_scores(j.scores, self.dim_weights) if j.ok else None
            if j.cached:
                self.stats["cache_hits"] += 1
            else:
                self.stats["latencies"].append(float(j.latency_s))
            if value is None:
                b.judge_failed, b.judge_error = True, j.error or "judgment without scores"
                self.stats["judge_failures"] += 1
            else:
                b.rubric = value
                b.dims = {d: (None if j.scores.get(d) is None else float(j.scores[d])) for d in DIMENSIONS}
        self._apply_fallback(out, to_judge, group_ids)
        for b in out:
            b.total = self.wf * b.format + self.we * b.emotion + self.wr * b.rubric
        return out

    def _apply_fallback(self, out: list[RewardBreakdown], judged_idx: list[int], group_ids: Sequence[Any]) -> None:
        ok_by_group: dict = defaultdict(list)
        for i in judged_idx:
            if not out[i].judge_failed:
                ok_by_group[group_ids[i]].append(out[i].rubric)
        for i in judged_idx:
            b = out[i]
            if not b.judge_failed:
                continue
            if self.fallback == "zero":
                b.rubric = 0.0
            elif self.fallback == "midpoint":
                b.rubric = 0.5
            else:
                vals = ok_by_group.get(group_ids[i])
                b.rubric = sum(vals) / len(vals) if vals else NEUTRAL_IF_NONE
            b.fallback = True
            self.stats["fallbacks"] += 1

    def score_sync(self, samples: Sequence[Any], completions: Sequence[str],
                   group_ids: Optional[Sequence[Any]] = None) -> list[RewardBreakdown]:
        """`score` for synchronous callers (CLI, evaluation) that run no event loop of their own."""
        return asyncio.run(self.score(samples, completions, group_ids))
