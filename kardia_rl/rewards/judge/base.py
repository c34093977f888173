"""The judge contract shared by every rubric-judge backend.

A *judge request* is one candidate to score: the user's profile, situation and visible history (ending
with the user turn) and ONLY the response span of the candidate (the judge never sees the candidate's
understanding/reasoning/emotion spans, which could argue for their own score).

Two kinds of backends:
- `ChatBackend` (vllm, openai, hf): turns chat messages into text; `RubricJudge` (rubric.py) builds the
  rubric prompt, calls the backend, parses the scores, retries, falls back, caches.
- `JudgeBackend` (embedding, and RubricJudge itself): scores requests directly.

The timeout and retry policy (`RetryPolicy`, the config's judge.timeout_s / max_retries / backoff_s /
pool_max_attempts) is read once, by the factory (factory.py), and each part goes to the one layer that
applies it; no layer looks at another's settings:
- timeout_s -> the ChatBackend, per attempt (one HTTP request, one engine batch), so that time spent queued
  behind a rate limiter is never counted as a judge timeout; a timed-out attempt comes back as a
  `ChatRequestError(kind="timeout")`;
- max_retries, backoff_s -> RubricJudge, one budget per request shared by transport failures and re-asks
  after an unparseable answer, so a request costs at most max_retries + 1 backend attempts whatever fails;
  a ChatBackend makes exactly one attempt per conversation and says whether its error is worth a retry;
- pool_max_attempts -> the Ray judge pool (cluster/judge_pool.py): sends of one batch when actors die.

Everything is async so the Ray judge pool can keep many requests in flight and score each candidate as
soon as it is generated.
"""
from __future__ import annotations

import abc
import functools
import random
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from kardia_rl.config.schema import RUBRIC_DIMENSIONS as DIMENSIONS  # noqa: F401  (the judge contract's name)
from kardia_rl.errors import ConfigError

SCORE_MIN, SCORE_MAX = 1.0, 5.0
MAX_RAW_CHARS = 2000  # the judge's raw text kept on a Judgment (samples table, error reports)
MAX_RETRY_AFTER_S = 60.0  # never sleep longer than this on a server's Retry-After


@dataclass(frozen=True)
class JudgeRequest:
    person: str
    situation: str
    history: tuple  # tuple of (role, content) pairs, ending with the user turn being answered
    response: str  # the candidate's response span only
    group_id: str = ""  # the prompt this candidate answers (for group-wise judging / neutral fallback)

    def context(self) -> tuple:
        """What the candidate answers (profile, situation, history): requests that share it are siblings."""
        return (self.person, self.situation, self.history)

    def cache_key(self, rubric_version: str, siblings: Optional[tuple] = None) -> tuple:
        """The judgment's cache key. A judgment made with the candidate alone ("single") and one made next to
        its siblings ("group": `siblings` is the sorted tuple of every response judged in that call, this
        one included) never share an entry, and a group score is only reused for the very same sibling set:
        a score relative to other candidates is not a score for another set."""
        if siblings is None:
            return ("single", rubric_version, *self.context(), self.response)
        return ("group", rubric_version, *self.context(), tuple(siblings), self.response)


@dataclass
class Judgment:
    """Scores on the 1-5 scale per dimension (None when the judgment failed), with rationales."""
    scores: dict[str, Optional[float]]
    rationale: dict[str, str] = field(default_factory=dict)
    ok: bool = True
    error: Optional[str] = None  # why it failed (timeout, parse error, http 500 ...), for counting/logging
    raw: str = ""  # the judge's raw text (truncated), for the samples table
    latency_s: float = 0.0
    attempts: int = 1
    cached: bool = False
    fallback: bool = False  # scores were filled in by the fallback policy, not by the judge


class JudgeBackend(abc.ABC):
    """Scores requests directly."""

    name: str = "judge"

    @abc.abstractmethod
    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgment]:
        """One Judgment per request, in order. Must not raise for per-request failures."""

    async def close(self) -> None:
        return None


class ChatBackend(abc.ABC):
    """Chat completion for LLM judges: one text per message list (or the exception it failed with).

    One attempt per conversation, bounded by the backend's per-attempt timeout; retrying is RubricJudge's."""

    name: str = "chat"

    @abc.abstractmethod
    async def complete(self, conversations: Sequence[list[dict]], *, temperature: float, max_tokens: int,
                       seed: Optional[int] = None) -> list:
        """Return a list aligned with `conversations` of `str` completions or `Exception` instances."""

    async def close(self) -> None:
        return None


class ChatRequestError(Exception):
    """One failed ChatBackend attempt, returned (not raised) in `complete()`'s list. `kind`: http | timeout |
    connection | bad_response | internal; `retryable`: whether another attempt may succeed (False for a 4xx
    other than 429: the server will never accept the request); `retry_after_s`: the server's Retry-After."""

    def __init__(self, message: str, *, kind: str, status: Optional[int] = None, retryable: bool = True,
                 retry_after_s: float = 0.0):
        super().__init__(message)
        self.kind, self.status, self.retryable, self.retry_after_s = kind, status, retryable, retry_after_s

    def __reduce__(self):  # keyword-only fields: default pickling (args only) would lose them (Ray actors return these)
        return (functools.partial(ChatRequestError, kind=self.kind, status=self.status, retryable=self.retryable,
                                  retry_after_s=self.retry_after_s), (str(self),))

    def __repr__(self) -> str:
        return (f"ChatRequestError({str(self)!r}, kind={self.kind!r}, status={self.status!r}, "
                f"retryable={self.retryable})")


@dataclass(frozen=True)
class RetryPolicy:
    """The judge's timeout and retry settings (see the module docstring for which layer applies which)."""
    timeout_s: float = 60.0  # per backend attempt
    max_retries: int = 3  # per request, transport failures and re-asks together
    backoff_s: float = 0.5  # before retry k: backoff_s * 2**(k-1), jittered to 50-100 %
    pool_max_attempts: int = 3  # sends of one batch to the judge pool (actor deaths)

    def __post_init__(self):
        for key, ok in (("timeout_s", self.timeout_s > 0), ("max_retries", self.max_retries >= 0),
                        ("backoff_s", self.backoff_s >= 0), ("pool_max_attempts", self.pool_max_attempts >= 1)):
            if not ok:
                raise ConfigError(f"judge.{key}: invalid value {getattr(self, key)!r}")

    @classmethod
    def from_config(cls, cfg_judge) -> "RetryPolicy":
        return cls(timeout_s=float(cfg_judge.timeout_s), max_retries=int(cfg_judge.max_retries),
                   backoff_s=float(cfg_judge.backoff_s), pool_max_attempts=int(cfg_judge.pool_max_attempts))


def retry_delay(backoff_s: float, retry: int, rng: random.Random, retry_after_s: float = 0.0) -> float:
    """Seconds to wait before retry number `retry` (1, 2, ...): backoff_s * 2**(retry-1), jittered to 50-100 %
    (requests failed by one burst do not come back in lockstep), and at least the server's Retry-After (capped)."""
    backoff = backoff_s * 2 ** (retry - 1) * (0.5 + 0.5 * rng.random())
    return max(backoff, min(retry_after_s, MAX_RETRY_AFTER_S))


def aggregate_scores(scores: Mapping[str, Optional[float]], weights: Optional[Mapping[str, float]] = None
                     ) -> Optional[float]:
    """Weighted mean of the 1-5 scores mapped to [0, 1]: sum_d w_d (s_d - 1) / 4 / sum_d w_d.

    Dimensions with weight 0 are ignored; None when a weighted dimension has no score (a failed judgment
    must be handled by a fallback, never silently aggregated)."""
    w = {d: float((weights or {}).get(d, 1.0)) for d in DIMENSIONS}  # an omitted dimension keeps weight 1
    total = sum(v for v in w.values() if v > 0)
    if total <= 0:
        raise ValueError(f"dimension weights sum to 0: {dict(w)}")
    acc = 0.0
    for d, wd in w.items():
        if wd <= 0:
            continue
        s = scores.get(d)
        if s is None:
            return None
        acc += wd * (min(SCORE_MAX, max(SCORE_MIN, float(s))) - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)
    return acc / total


def failed_judgment(error: str, raw: str = "", latency_s: float = 0.0, attempts: int = 0) -> Judgment:
    """A judgment that ended without scores: counted, and filled in by the caller's fallback policy."""
    return Judgment(scores={d: None for d in DIMENSIONS}, ok=False, error=error[:500], raw=raw[:MAX_RAW_CHARS],
                    latency_s=latency_s, attempts=attempts, fallback=True)
