"""Validation of KardiaBench records, reporting every problem as `PATH:LINE: field: message`.

Checked: JSON syntax; required fields present and of the right type; MBTI shape; emotion in the active
label set (after normalisation); message roles known; a system prompt first; user/assistant alternating
from the first user turn and ending on an assistant turn; every assistant turn a well-formed four-span
answer (the same strict parser the format reward uses) whose emotion span is a known label.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from kardia_rl.data.emotions import EMOTIONS_32, normalize_emotion
from kardia_rl.data.schema import REQUIRED_FIELDS, ROLES, Dialogue, expand_turns
from kardia_rl.data.sources import iter_rows, resolve
from kardia_rl.errors import DataError
from kardia_rl.format.spans import parse_spans

_MBTI = re.compile(r"^[EI][NS][TF][JP](-[AT])?$", re.IGNORECASE)


def check_record(rec: object, labels: Sequence[str] = EMOTIONS_32, notation: str = "kardia") -> list[tuple[str, str]]:
    """All problems of one record as (field, message) pairs; empty when valid."""
    if not isinstance(rec, dict):
        return [("record", f"expected a JSON object, got {type(rec).__name__}")]
    probs: list[tuple[str, str]] = []
    for k in REQUIRED_FIELDS:
        if k not in rec:
            probs.append((k, "missing required field"))
        elif k != "messages" and not isinstance(rec[k], str):
            probs.append((k, f"expected a string, got {type(rec[k]).__name__}"))
        elif k != "messages" and k != "situation" and not rec[k].strip():
            probs.append((k, "empty"))
    if isinstance(rec.get("mbti"), str) and rec["mbti"].strip() and not _MBTI.match(rec["mbti"].strip()):
        probs.append(("mbti", f"{rec['mbti']!r} is not an MBTI type like 'INFJ'"))
    if isinstance(rec.get("emotion"), str) and rec["emotion"].strip() and normalize_emotion(rec["emotion"], labels) is None:
        probs.append(("emotion", f"{rec['emotion']!r} is not in the label set"))
    msgs = rec.get("messages")
    if "messages" in rec and not isinstance(msgs, list):
        probs.append(("messages", f"expected a list, got {type(msgs).__name__}"))
    elif isinstance(msgs, list):
        probs.extend(_check_messages(msgs, labels, notation))
    return probs


def _check_messages(msgs: list, labels: Sequence[str], notation: str) -> list[tuple[str, str]]:
    probs: list[tuple[str, str]] = []
    if not msgs:
        return [("messages", "empty")]
    roles = []
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            probs.append((f, f"expected an object with 'role' and 'content', got {type(m).__name__}"))
            roles.append(None)
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            probs.append((f"{f}.role", f"unknown role {role!r}; expected one of {list(ROLES)}"))
        if not isinstance(content, str):
            probs.append((f"{f}.content", f"expected a string, got {type(content).__name__}"))
        elif role == "assistant":
            res = parse_spans(content, notation)
            for e in res.errors:
                probs.append((f"{f}.content", e.message))
            emo = res.found.get("emotion")
            if emo and normalize_emotion(emo, labels) is None:
                probs.append((f"{f}.content", f"emotion span {emo!r} is not in the label set"))
        elif isinstance(content, str) and not content.strip():
            probs.append((f"{f}.content", "empty"))
        roles.append(role)
    if roles[0] != "system":
        probs.append(("messages[0].role", f"expected a system prompt first, got {roles[0]!r}"))
    expect = "user"
    for i, r in enumerate(roles):
        if i == 0 and r == "system" or r not in ("user", "assistant"):
            if r == "system" and i > 0:
                probs.append((f"messages[{i}].role", "system prompt allowed only as the first message"))
            continue
        if r != expect:
            probs.append((f"messages[{i}].role", f"roles out of order: expected {expect!r}, got {r!r}"))
        expect = "assistant" if r == "user" else "user"
    body = [r for r in roles if r in ("user", "assistant")]
    if "assistant" not in body:
        probs.append(("messages", "no assistant turn to learn from"))
    elif body and body[-1] == "user":
        probs.append((f"messages[{len(roles) - 1}].role", "dialogue ends with a user turn that has no reply"))
    return probs


@dataclass
class ValidationReport:
    dialogues: list[Dialogue] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "PATH:LINE: field: message"

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        turns = [t for d in self.dialogues for t in expand_turns(d)]
        return {"dialogues": len(self.dialogues), "turns": len(turns),
                "profiles": len({d.anon_username for d in self.dialogues}),
                "emotions": dict(sorted(Counter(d.emotion for d in self.dialogues).items()))}


def validate(path: str, labels: Sequence[str] = EMOTIONS_32, notation: str = "kardia",
             split: str = "train") -> ValidationReport:
    """Read every record of `path` (see data.sources for accepted forms) and collect all problems."""
    rep = ValidationReport()
    for src in resolve(path):
        for line, rec, err in iter_rows(src, split):
            if err:
                rep.problems.append(f"{src}:{line}: record: {err}")
                continue
            probs = check_record(rec, labels, notation)
            rep.problems.extend(f"{src}:{line}: {f}: {msg}" for f, msg in probs)
            if not probs:
                extra = {k: v for k, v in rec.items() if k not in REQUIRED_FIELDS}
                msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
                rep.dialogues.append(Dialogue(
                    person=rec["person"], mbti=rec["mbti"].strip().upper(),
                    emotion=normalize_emotion(rec["emotion"], labels), situation=rec["situation"],
                    anon_username=rec["anon_username"], messages=msgs, source=f"{src}:{line}", extra=extra))
    return rep


def load_dialogues(path: str, labels: Sequence[str] = EMOTIONS_32, notation: str = "kardia",
                   split: str = "train", max_problems: int = 20) -> list[Dialogue]:
    """Valid dialogues of `path`, or DataError listing the problems (training never runs on bad data)."""
    rep = validate(path, labels, notation, split)
    if rep.problems:
        shown = "\n".join(rep.problems[:max_problems])
        more = f"\n... and {len(rep.problems) - max_problems} more" if len(rep.problems) > max_problems else ""
        raise DataError(f"{len(rep.problems)} problem(s) in {path} (run `kardia-rl validate-data {path}`):\n"
                        f"{shown}{more}")
    if not rep.dialogues:
        raise DataError(f"{path}: no dialogues found")
    return rep.dialogues
