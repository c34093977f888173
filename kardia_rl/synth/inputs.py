"""Synthesis inputs: user profiles and seed situations.

Profiles come as JSONL (one object a line: `person`, or the PersonalityCafe fields `about` / `signature` /
`recent_activities`; `mbti`; `anon_username` or `username`) or as plain text in the PersonalityCafe style,
one profile per block separated by blank lines (or `---` lines):

    Username: quiet_reader
    MBTI: INFJ
    About: I'm a librarian ...
    Signature: "Be gentle."
    Recent Activities: Posted a poem ...

A field may continue on the following lines until the next `Name:` line. Privacy: a raw `username` is
never written anywhere; it becomes `anon_username` = "u_" + sha256(salt + username)[:16], which cannot be
inverted without the salt (keep the salt private: a dictionary of guessed usernames plus the salt would
reverse it). URLs and e-mail addresses are removed from every profile text, because forum signatures and
activity lines are full of them and they identify people.

Seeds come as CSV (header with `situation` and `emotion`) or JSONL objects with those fields; each emotion
must be in the active label set (data.emotion_labels) after normalisation. Any bad line raises DataError
naming `file:line` and the field, which the CLI turns into one line and exit status 2.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

from kardia_rl.data.emotions import normalize_emotion
from kardia_rl.errors import DataError
from kardia_rl.data.sources import iter_jsonl

_MBTI = re.compile(r"^[EI][NS][TF][JP](-[AT])?$", re.IGNORECASE)
# Schemes, www. hosts and bare domains with a path; e-mail first so its domain is not left behind.
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"(?:\b[a-z][a-z0-9+.-]*://|\bwww\.)\S+|\b[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|io|co|edu|gov|ly|me)"
                  r"(?:/\S*)?\b", re.IGNORECASE)
_FIELD_LINE = re.compile(r"^\s*(username|user|mbti|about|signature|recent activities|recent_activities)\s*:\s?(.*)$",
                         re.IGNORECASE)
PROFILE_FIELDS = ("about", "signature", "recent_activities")


@dataclass(frozen=True)
class Profile:
    person: str  # the profile text shown to U, A and R ("MBTI: ...\nAbout: ...")
    mbti: str
    anon_username: str
    source: str  # "file:line", for messages


@dataclass(frozen=True)
class Seed:
    situation: str
    emotion: str  # a label of the active set
    index: int  # position in the seeds file (0-based): part of the dialogue id
    source: str


def scrub(text: str) -> str:
    """`text` without e-mail addresses and URLs, whitespace runs inside lines collapsed."""
    t = _URL.sub(" ", _EMAIL.sub(" ", str(text)))
    return "\n".join(" ".join(line.split()) for line in t.splitlines()).strip()


def anonymize(username: str, salt: str) -> str:
    """Irreversible pseudonym of a username (salted sha256); the same name and salt give the same pseudonym."""
    if not salt:
        raise ValueError("anonymize needs a non-empty salt")
    return "u_" + hashlib.sha256(f"{salt}\x1f{username.strip().lower()}".encode("utf-8")).hexdigest()[:16]


def person_text(mbti: str, fields: dict) -> str:
    """The KardiaBench `person` string (the form of the released data)."""
    lines = [f"MBTI: {mbti}"]
    for key, title in (("about", "About"), ("signature", "Signature"), ("recent_activities", "Recent Activities")):
        value = scrub(fields.get(key) or "")
        if value:
            lines.append(f"{title}: {value}")
    return "\n".join(lines)


def _make_profile(raw: dict, salt: str, where: str) -> Profile:
    mbti = str(raw.get("mbti") or "").strip().upper()
    if not _MBTI.match(mbti):
        raise DataError(f"{where}: mbti: {raw.get('mbti')!r} is not an MBTI type like 'INFJ'")
    if raw.get("username") not in (None, ""):
        if not isinstance(raw["username"], str):
            raise DataError(f"{where}: username: expected a string, got {type(raw['username']).__name__}")
        anon = anonymize(raw["username"], salt)
    elif isinstance(raw.get("anon_username"), str) and raw["anon_username"].strip():
        anon = raw["anon_username"].strip()
    else:
        raise DataError(f"{where}: username: missing (give 'username', hashed on the way in, or 'anon_username')")
    if isinstance(raw.get("person"), str) and raw["person"].strip():
        body = scrub(raw["person"])
        person = body if body.upper().startswith("MBTI:") else f"MBTI: {mbti}\n{body}"
    else:
        bad = [k for k in PROFILE_FIELDS if raw.get(k) is not None and not isinstance(raw[k], str)]
        if bad:
            raise DataError(f"{where}: {bad[0]}: expected a string, got {type(raw[bad[0]]).__name__}")
        if not any(scrub(raw.get(k) or "") for k in PROFILE_FIELDS):
            raise DataError(f"{where}: person: missing (give 'person' or at least one of {', '.join(PROFILE_FIELDS)})")
        person = person_text(mbti, raw)
    return Profile(person=person, mbti=mbti, anon_username=anon, source=where)


def _text_blocks(path: str) -> Iterator[tuple[int, dict]]:
    """(first line, fields) per PersonalityCafe-style block; a line that is no `Name:` continues the last field."""
    block: dict = {}
    start, last = 0, None
    with open(path, encoding="utf-8") as f:
        lines = list(enumerate(f, 1)) + [(-1, "")]
    for n, line in lines:
        if not line.strip() or line.strip() == "---":
            if block:
                yield start, block
            block, last = {}, None
            continue
        m = _FIELD_LINE.match(line)
        if m:
            key = m.group(1).lower().replace(" ", "_")
            key = "username" if key == "user" else key
            if not block:
                start = n
            block[key] = m.group(2).strip()
            last = key
        elif last is not None:
            block[last] += "\n" + line.strip()
        else:
            raise DataError(f"{path}:{n}: profile: expected 'Username:', 'MBTI:', 'About:', 'Signature:' or "
                            f"'Recent Activities:' at the start of a block, got {line.strip()[:60]!r}")


def load_profiles(path: str, salt: str) -> list[Profile]:
    """Profiles of a .jsonl file or of a PersonalityCafe-style text file (any other extension)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: profiles file not found")
    rows = iter_jsonl(path, "record") if path.endswith(".jsonl") else _text_blocks(path)
    out = [_make_profile(raw, salt, f"{path}:{n}") for n, raw in rows]
    if not out:
        raise DataError(f"{path}: no profiles found")
    return out


def load_seeds(path: str, labels: Sequence[str]) -> list[Seed]:
    """Seed (situation, emotion) pairs of a .csv or .jsonl file, emotions normalised into `labels`."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: seeds file not found")
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [k for k in ("situation", "emotion") if k not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}:1: {missing[0]}: missing column (the header needs 'situation' and 'emotion')")
            rows = [(reader.line_num, dict(r)) for r in reader]
    elif path.endswith(".jsonl"):
        rows = list(iter_jsonl(path, "record"))
    else:
        raise DataError(f"{path}: seeds must be a .csv or .jsonl file")
    out = []
    for n, raw in rows:
        where = f"{path}:{n}"
        for key in ("situation", "emotion"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise DataError(f"{where}: {key}: missing or empty")
        emotion = normalize_emotion(raw["emotion"], labels)
        if emotion is None:
            raise DataError(f"{where}: emotion: {raw['emotion']!r} is not in the active label set "
                            f"(data.emotion_labels; {len(labels)} labels)")
        out.append(Seed(situation=scrub(raw["situation"]), emotion=emotion, index=len(out), source=where))
    if not out:
        raise DataError(f"{path}: no seeds found")
    return out


def dialogue_id(profile: Profile, seed: Seed) -> str:
    """Stable id of the (profile, seed) pair: the resume key (same inputs, same id, in any run)."""
    key = "\x1f".join([profile.anon_username, profile.person, seed.situation, seed.emotion])
    return "syn-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def pairs(profiles: Sequence[Profile], seeds: Sequence[Seed], mode: str, limit: int = 0) -> list[tuple[Profile, Seed]]:
    """The dialogues to synthesise: `zip` gives seed i the profile i mod P (one dialogue per seed), `product`
    every profile with every seed. Duplicate pairs (same id) are kept once."""
    if mode == "zip":
        todo = [(profiles[s.index % len(profiles)], s) for s in seeds]
    elif mode == "product":
        todo = [(p, s) for s in seeds for p in profiles]
    else:
        raise DataError(f"synth.pairing: {mode!r} is not one of zip, product")
    seen, out = set(), []
    for p, s in todo:
        i = dialogue_id(p, s)
        if i not in seen:
            seen.add(i)
            out.append((p, s))
    return out[:limit] if limit > 0 else out
