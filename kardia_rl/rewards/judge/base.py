"""The judge contract shared by every rubric-judge backend.

A *judge request* is one candidate to score: the user's profile, situation and visible history (ending
with the user turn) and ONLY the response span of the candidate (the judge never sees the candidate's
understanding/reasoning/emotion spans, which could argue for their own score).

Two kinds of backends:
- `ChatBackend` (vllm, openai, hf): turns chat messages into text; `RubricJudge` (rubric.py) builds the
  rubric prompt, calls the backend, parses the scores, retries, falls back, caches.
- `JudgeBackend` (embedding, and RubricJudge itself): scores requests directly.

Everything is async so the Ray judge pool can keep many requests in flight and score each candidate as
soon as it is generated.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional, Sequence

DIMENSIONS: tuple[str, ...] = ("relevance", "fluency", "empathy", "persona_consistency", "safety")
SCORE_MIN, SCORE_MAX = 1.0, 5.0


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
    """Chat completion for LLM judges: one text per message list (or the exception it failed with)."""

    name: str = "chat"

    @abc.abstractmethod
    async def complete(self, conversations: Sequence[list[dict]], *, temperature: float, max_tokens: int,
                       seed: Optional[int] = None) -> list:
        """Return a list aligned with `conversations` of `str` completions or `Exception` instances."""

    async def close(self) -> None:
        return None
