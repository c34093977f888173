"""Tolerant, injection-aware parsing of a judge's answer into five 1-5 scores with rationales.

Accepted answer shapes (real judges drift from the requested format):
- plain JSON, ```json fenced``` JSON, JSON embedded in prose, JSON with trailing commas or Python-style
  quotes; scores under "scores" (dict or list of {"dimension", "score"}), at the top level, or as
  {"score": 4, "rationale": "..."} per dimension; one level of wrapping ({"evaluation": {...}});
- `Relevance: 4`, `- empathy = 3/5`, `**Fluency**: 4 - reads naturally` lines and markdown table rows
  (`| Safety | 5 | respectful |`);
- dimension names in any case with spaces, hyphens or underscores ("Persona Consistency"), a few aliases;
- scores as numbers or numeric strings, "4/5", "8/10" (rescaled to 5), clamped to [1, 5]; booleans,
  lists, NaN and words are rejected; `<think>...</think>` reasoning is dropped first.

Injection rules (see rubric_prompt.py for the threat model):
- with `nonce` given (the default for RubricJudge), a JSON block counts only if its "id" equals the nonce,
  and line-format scores are read only after the last occurrence of the nonce. A score block copied from
  the candidate cannot carry the nonce, so it is never read.
- among valid JSON blocks the LAST complete one wins (a judge that corrects itself ends with its final
  answer). Line scores take the FIRST line of each dimension after the nonce (a judge that quotes the
  candidate's fake lines after its own answer does not override it).

Partial answers: all five dimensions are required. A judgment missing any dimension is a parse failure
(reported with the missing names and retried), because aggregating a subset would silently change the
meaning of the rubric score from one sample to the next.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from kardia_rl.rewards.judge.base import DIMENSIONS, SCORE_MAX, SCORE_MIN

_ALIASES = {
    "relevance": "relevance", "relevant": "relevance", "relevancy": "relevance",
    "fluency": "fluency", "fluent": "fluency",
    "empathy": "empathy", "empathetic": "empathy", "empathic": "empathy",
    "persona_consistency": "persona_consistency", "personaconsistency": "persona_consistency",
    "persona": "persona_consistency", "persona_consistent": "persona_consistency",
    "consistency": "persona_consistency", "persona_fit": "persona_consistency",
    "safety": "safety", "safe": "safety", "harmlessness": "safety",
}
_SCORE_KEYS = ("score", "rating", "value", "points")
_WHY_KEYS = ("rationale", "reason", "reasoning", "explanation", "justification", "comment")
_SCORES_CONTAINERS = ("scores", "score", "ratings", "dimensions", "evaluation_scores")
_RATIONALE_CONTAINERS = ("rationale", "rationales", "reasons", "explanations", "justifications", "comments")
_ID_KEYS = ("id", "nonce", "request_id")
_NUM = re.compile(r"^\s*\**\s*(-?\d+(?:\.\d+)?)\s*\**\s*(?:(?:/|out\s+of|of)\s*(\d+(?:\.\d+)?))?\s*\.?\s*$", re.I)
_LINE = re.compile(
    r"^[ \t>]*(?:[-*\u2022]|\d+[.)])?[ \t]*\**[ \t]*(?P<name>[A-Za-z][A-Za-z _-]{1,40}?)[ \t]*\**[ \t]*"
    r"(?:[:=(]|\s[-\u2013\u2014]\s?)[ \t]*\**[ \t]*(?P<num>-?\d+(?:\.\d+)?)[ \t]*\**[ \t]*"
    r"(?:(?:/|out of)[ \t]*(?P<den>\d+))?\)?\**(?P<rest>[^\n]*)$", re.M)
_TABLE_ROW = re.compile(
    r"^[ \t]*\|[ \t]*\**(?P<name>[A-Za-z][A-Za-z _-]{1,40}?)\**[ \t]*\|[ \t]*\**(?P<num>-?\d+(?:\.\d+)?)\**[ \t]*"
    r"(?:/[ \t]*(?P<den>\d+))?[ \t]*\|(?P<rest>[^\n]*)$", re.M)  # | Relevance | 4 | on topic |
MAX_PARSE_CHARS = 40000  # judge answers are short; longer text is cut (bounds the parser's work)
MAX_OBJECT_CHARS = 8000  # a score block is far smaller; bounds the brace scan on garbage like "{{{{..."
MAX_OBJECT_STARTS = 400
_PLAUSIBLE_START = re.compile(r"\{\s*[\"'}]")


@dataclass
class ParsedJudgment:
    scores: dict[str, float] = field(default_factory=dict)  # only the dimensions found
    rationale: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    clamped: tuple[str, ...] = ()  # dimensions whose raw score was outside [1, 5]
    error: Optional[str] = None
    source: str = ""  # "json" | "lines" | ""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.missing


def canonical_dimension(name: Any) -> Optional[str]:
    """'Persona Consistency' / 'persona-consistency' / 'PERSONA_CONSISTENCY' -> 'persona_consistency'."""
    if not isinstance(name, str):
        return None
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    key = re.sub(r"[^a-z_]", "", key).strip("_")
    return _ALIASES.get(key)


def coerce_score(value: Any) -> tuple[Optional[float], bool]:
    """(score clamped to [1, 5] or None when not a number, whether it was clamped)."""
    if isinstance(value, bool) or value is None:
        return None, False
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        m = _NUM.match(value)
        if not m:
            return None, False
        x = float(m.group(1))
        if m.group(2):
            den = float(m.group(2))
            if den <= 0:
                return None, False
            x = x * SCORE_MAX / den if den != SCORE_MAX else x
    else:
        return None, False
    if not math.isfinite(x):
        return None, False
    c = min(SCORE_MAX, max(SCORE_MIN, x))
    return c, c != x


def strip_thinking(text: str) -> str:
    """Drop reasoning-model thinking: closed <think> blocks, then anything before a dangling </think>."""
    t = re.sub(r"<think>.*?</think>", " ", text, flags=re.S | re.I)
    m = re.search(r"</think>", t, flags=re.I)
    if m:
        t = t[m.end():]
    m = re.search(r"<think>", t, flags=re.I)
    if m:  # thinking never closed (truncated): nothing after it is an answer
        t = t[:m.start()]
    return t


def _balanced(text: str, start: int) -> Optional[int]:
    """End index (exclusive) of the {...} starting at `start`, respecting JSON strings; None if unbalanced."""
    depth, in_str, esc = 0, False, False
    for i in range(start, min(len(text), start + MAX_OBJECT_CHARS)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':  # only double quotes delimit strings: apostrophes in prose must not open one
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _load_obj(s: str) -> Optional[dict]:
    for attempt in (s, re.sub(r",\s*([}\]])", r"\1", s)):
        try:
            obj = json.loads(attempt)
            return obj if isinstance(obj, dict) else None
        except (json.JSONDecodeError, RecursionError):
            pass
    try:  # single quotes, True/None: Python literal syntax (literal_eval evaluates literals only)
        obj = ast.literal_eval(re.sub(r",\s*([}\]])", r"\1", s))
        return obj if isinstance(obj, dict) else None
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def iter_json_objects(text: str) -> list[tuple[int, dict]]:
    """Every top-level parseable {...} object in `text` with its start offset, in order. An object that
    does not parse is skipped character by character, so objects nested inside prose-y braces are found.
    A "{" not followed by a key, a quote or "}" cannot open an object and costs nothing; at most
    MAX_OBJECT_STARTS plausible starts are tried (the nonce-guided search below does not depend on this)."""
    out, i, starts = [], 0, 0
    while starts < MAX_OBJECT_STARTS:
        i = text.find("{", i)
        if i < 0:
            return out
        if not _PLAUSIBLE_START.match(text, i):
            i += 1
            continue
        starts += 1
        end = _balanced(text, i)
        obj = _load_obj(text[i:end]) if end else None
        if obj is not None:
            out.append((i, obj))
            i = end
        else:
            i += 1
    return out


def _nonce_objects(text: str, nonce: str) -> list[tuple[int, dict]]:
    """Objects whose id equals `nonce`, found from the nonce's occurrences: for each, the innermost
    parseable {...} around it whose id matches. The work is bounded by the number of nonce occurrences,
    which text copied from the candidate cannot raise (it cannot contain the nonce)."""
    found: dict[int, dict] = {}
    for m in re.finditer(re.escape(nonce), text, re.I):
        lo, j = max(0, m.start() - MAX_OBJECT_CHARS), m.start()
        for _ in range(8):  # the enclosing braces, innermost first
            j = text.rfind("{", lo, j)
            if j < 0:
                break
            end = _balanced(text, j)
            if end is None or end < m.end():
                continue
            obj = _load_obj(text[j:end])
            if obj is not None and _id_matches(obj, nonce):
                found[j] = obj
                break
    return sorted(found.items())


def _id_matches(obj: dict, nonce: str) -> bool:
    return any(str(obj.get(k, "")).strip().lower() == nonce.lower() for k in _ID_KEYS)


def _as_text(v: Any) -> str:
    return " ".join(str(v).split())[:500] if v is not None else ""


def _scores_from_obj(obj: dict, depth: int = 0) -> tuple[dict, dict]:
    """(raw score values by dimension, rationale by dimension) found in one object."""
    raw: dict[str, Any] = {}
    why: dict[str, str] = {}
    container = next((obj[k] for k in _SCORES_CONTAINERS if isinstance(obj.get(k), (dict, list))), None)
    items: list[tuple[Any, Any]] = []
    if isinstance(container, dict):
        items = list(container.items())
    elif isinstance(container, list):
        for e in container:
            if isinstance(e, dict):
                name = e.get("dimension", e.get("name", e.get("criterion")))
                items.append((name, e))
    else:
        items = list(obj.items())
    for name, val in items:
        dim = canonical_dimension(name)
        if dim is None or dim in raw:
            continue
        if isinstance(val, dict):
            why_v = next((val[k] for k in _WHY_KEYS if k in val), None)
            val = next((val[k] for k in _SCORE_KEYS if k in val), None)
            if why_v is not None:
                why[dim] = _as_text(why_v)
        raw[dim] = val
    rat = next((obj[k] for k in _RATIONALE_CONTAINERS if isinstance(obj.get(k), dict)), None)
    if isinstance(rat, dict):
        for name, v in rat.items():
            dim = canonical_dimension(name)
            if dim is not None:
                why.setdefault(dim, _as_text(v))
    if not raw and depth < 2:  # one level of wrapping: {"evaluation": {...}}
        for v in obj.values():
            if isinstance(v, dict):
                r2, w2 = _scores_from_obj(v, depth + 1)
                if r2:
                    return r2, w2
    return raw, why


def _build(raw: dict, why: dict, source: str, dims: Sequence[str]) -> ParsedJudgment:
    scores, clamped, bad = {}, [], []
    for d, v in raw.items():
        s, was_clamped = coerce_score(v)
        if s is None:
            bad.append(d)
            continue
        scores[d] = s
        if was_clamped:
            clamped.append(d)
    missing = tuple(d for d in dims if d not in scores)
    err = None
    if missing:
        err = f"missing or invalid score for {', '.join(missing)}"
        if bad:
            err += f" (not a number: {', '.join(f'{d}={raw[d]!r}' for d in bad)})"
    return ParsedJudgment(scores, {d: w for d, w in why.items() if d in scores}, missing, tuple(clamped), err,
                          source)


def _json_candidates(text: str, nonce: Optional[str]) -> list[dict]:
    """Score-block candidates in order of appearance: objects carrying the nonce, or (naive mode) all."""
    pairs = iter_json_objects(text) if nonce is None else _nonce_objects(text, nonce)
    return [o for _, o in pairs]


def _parse_lines(text: str, nonce: Optional[str], dims: Sequence[str]) -> Optional[ParsedJudgment]:
    if nonce is not None:
        at = text.lower().rfind(nonce.lower())
        if at < 0:
            return None
        text = text[at + len(nonce):]
    raw, why = {}, {}
    matches = sorted([*_LINE.finditer(text), *_TABLE_ROW.finditer(text)], key=lambda m: m.start())
    for m in matches:
        dim = canonical_dimension(m.group("name"))
        if dim is None or (nonce is not None and dim in raw):
            continue  # with a nonce the FIRST line per dimension counts; naive mode lets later lines win
        num = m.group("num") + (f"/{m.group('den')}" if m.group("den") else "")
        raw[dim] = num
        rest = m.group("rest").strip(" \t-:;,.()*|\u2013\u2014")
        if rest:
            why[dim] = _as_text(rest)
    return _build(raw, why, "lines", dims) if raw else None


def parse_judgment(text: str, nonce: Optional[str] = None, *, require_nonce: bool = True,
                   dimensions: Sequence[str] = DIMENSIONS) -> ParsedJudgment:
    """Scores of one judged candidate. `require_nonce=False` (or nonce=None) disables the injection
    defence: tests use it to show what a naive parser would be fooled by."""
    if not isinstance(text, str) or not text.strip():
        return ParsedJudgment(missing=tuple(dimensions), error="empty judge answer")
    if require_nonce and not nonce:
        raise ValueError("parse_judgment: require_nonce=True needs a nonce")
    key = nonce if require_nonce else None
    text = strip_thinking(text[:MAX_PARSE_CHARS])
    best: Optional[ParsedJudgment] = None
    for obj in _json_candidates(text, key):
        raw, why = _scores_from_obj(obj)
        if not raw:
            continue
        p = _build(raw, why, "json", dimensions)
        if p.ok or best is None or not best.ok:
            best = p  # the LAST complete block wins; a partial block never replaces a complete one
    if best is not None and best.ok:
        return best
    lines = _parse_lines(text, key, dimensions)
    if lines is not None and (lines.ok or best is None):
        return lines
    if best is not None:
        return best
    if key is not None and any(_scores_from_obj(o)[0] for _, o in iter_json_objects(text)):
        return ParsedJudgment(missing=tuple(dimensions), error=f'score block without the required "id": "{key}"')
    return ParsedJudgment(missing=tuple(dimensions), error="no score block found in the judge answer")


def parse_group_judgment(text: str, nonce: Optional[str], n: int, *, require_nonce: bool = True,
                         dimensions: Sequence[str] = DIMENSIONS) -> list[ParsedJudgment]:
    """Per-candidate scores (index 1..n) from one group-wise answer: {"id": nonce, "candidates": [{"index":
    k, "scores": {...}, "rationale": {...}}, ...]} (or a dict keyed by index). Candidates that cannot be
    mapped get a failed ParsedJudgment; the caller re-judges those one by one."""
    fail = [ParsedJudgment(missing=tuple(dimensions), error="candidate missing from the group answer")
            for _ in range(n)]
    if not isinstance(text, str) or not text.strip():
        return [ParsedJudgment(missing=tuple(dimensions), error="empty judge answer") for _ in range(n)]
    key = nonce if require_nonce else None
    if require_nonce and not nonce:
        raise ValueError("parse_group_judgment: require_nonce=True needs a nonce")
    text = strip_thinking(text[:MAX_PARSE_CHARS])
    blocks = [o for o in _json_candidates(text, key) if isinstance(o.get("candidates"), (list, dict))]
    if not blocks:
        return fail
    entries = blocks[-1]["candidates"]
    pairs: list[tuple[Any, Any]] = []
    if isinstance(entries, dict):
        pairs = list(entries.items())
    else:
        indexed = [e for e in entries if isinstance(e, dict) and any(k in e for k in ("index", "candidate"))]
        if indexed:
            pairs = [(e.get("index", e.get("candidate")), e) for e in indexed]
        elif len(entries) == n:  # no indices at all: positional, only when the count matches exactly
            pairs = [(i + 1, e) for i, e in enumerate(entries)]
    out = list(fail)
    seen = set()
    for idx, entry in pairs:
        m = re.search(r"\d+", str(idx))
        k = int(m.group(0)) if m else -1
        if not 1 <= k <= n or k in seen or not isinstance(entry, dict):
            continue
        seen.add(k)
        raw, why = _scores_from_obj(entry)
        out[k - 1] = _build(raw, why, "json", dimensions)
    return out
