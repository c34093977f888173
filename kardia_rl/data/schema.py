"""KardiaBench records and the per-turn samples the trainers consume.

A record (one dialogue) has the public release's fields: `person` (raw profile string), `mbti`, `emotion`
(target emotional state, the gold label for every turn), `situation`, `anon_username`, `messages`
(system prompt, then alternating user/assistant turns; assistant contents carry the four spans). Extra
fields (e.g. a synthesis `difficulty`) are kept in `extra`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

REQUIRED_FIELDS: tuple[str, ...] = ("person", "mbti", "emotion", "situation", "anon_username", "messages")
ROLES = ("system", "user", "assistant")
VERDICTS = ("FAIL", "PASS", "SOLVED")  # the rubric evaluator's verdicts in synthesis (method.md), paper order


def verdict_rate(verdicts) -> float:
    """A turn's resolution rate from its evaluator verdicts: 1 - p_FAIL. The one rule that synthesis' summary
    and the difficulty split both apply (easy when the rate >= split.tau)."""
    return 1.0 - sum(str(v).upper() == "FAIL" for v in verdicts) / len(verdicts)


@dataclass
class Dialogue:
    person: str
    mbti: str
    emotion: str
    situation: str
    anon_username: str
    messages: list[dict]
    source: str = ""  # "PATH:LINE" of the record, for messages that point users at their data
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Stable id from content (not file position), so splits do not change when files are reordered."""
        if "id" in self.extra:
            return str(self.extra["id"])
        first_user = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        key = "\x1f".join([self.anon_username, self.situation, first_user])
        return hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]

    @property
    def system(self) -> Optional[str]:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def to_record(self) -> dict:
        rec = {k: getattr(self, k) for k in REQUIRED_FIELDS}
        rec.update(self.extra)
        return rec


@dataclass
class TurnSample:
    """One QA pair: the profile and the history up to a user turn -> the target assistant turn."""
    id: str
    dialogue_id: str
    turn: int  # 0-based index of the assistant turn within the dialogue
    person: str
    mbti: str
    emotion: str
    situation: str
    anon_username: str
    system: Optional[str]
    history: list[dict]  # user/assistant messages before the target, ending with a user turn
    target: str  # the reference assistant four-span answer
    extra: dict = field(default_factory=dict)

    @property
    def user_turn(self) -> str:
        return self.history[-1]["content"]

    def to_record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "id", "dialogue_id", "turn", "person", "mbti", "emotion", "situation", "anon_username", "system",
            "history", "target")} | ({"extra": self.extra} if self.extra else {})

    @classmethod
    def from_record(cls, rec: dict) -> "TurnSample":
        return cls(**{**rec, "extra": rec.get("extra", {})})


def expand_turns(d: Dialogue) -> list[TurnSample]:
    """One sample per assistant turn (each with the full history before it)."""
    body = [m for m in d.messages if m["role"] != "system"]
    extra = {k: v for k, v in d.extra.items() if k != "id"}
    out, k = [], 0
    for i, m in enumerate(body):
        if m["role"] == "assistant" and i > 0 and body[i - 1]["role"] == "user":
            out.append(TurnSample(
                id=f"{d.id}/t{k}", dialogue_id=d.id, turn=k, person=d.person, mbti=d.mbti, emotion=d.emotion,
                situation=d.situation, anon_username=d.anon_username, system=d.system,
                history=[dict(x) for x in body[:i]], target=m["content"], extra=extra))
            k += 1
    return out
