"""Four-span answers: `<|understanding_begin|>…<|understanding_end|><|reasoning_begin|>…<|reasoning_end|>
<|emotion_begin|>…<|emotion_end|><|response_begin|>…<|response_end|>`.

`parse_spans` is the single source of truth for "is this answer well-formed": the format reward, the data
validator and the evaluation all call it. It is strict (only whitespace may sit outside the spans) and
returns every reason an answer fails, so rewards can be graded and users see *why* an output is rejected.
The public KardiaBench card also shows an XML-like notation (`<understanding>…</understanding>`); pass
`notation="xml"` or `"auto"` to accept it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from kardia_rl.config.schema import SPAN_NOTATIONS

SPAN_NAMES: tuple[str, ...] = ("understanding", "reasoning", "emotion", "response")
SPAN_TOKENS: tuple[str, ...] = tuple(f"<|{n}_{e}|>" for n in SPAN_NAMES for e in ("begin", "end"))

_KARDIA_TAG = re.compile(r"<\|(understanding|reasoning|emotion|response)_(begin|end)\|>")
_XML_TAG = re.compile(r"<(/?)(understanding|reasoning|emotion|response)>")
# Any span tag of either notation: what the stripper removes and what a well-formed span may not contain.
SPAN_TAG = re.compile(f"{_KARDIA_TAG.pattern}|{_XML_TAG.pattern}")


@dataclass(frozen=True)
class FourSpans:
    understanding: str
    reasoning: str
    emotion: str
    response: str

    def as_dict(self) -> dict:
        return {n: getattr(self, n) for n in SPAN_NAMES}


@dataclass(frozen=True)
class SpanError:
    """One reason a text is not a well-formed four-span answer. `code` is machine-readable."""
    code: str  # missing | duplicated | out_of_order | empty | outside_text | unclosed | unmatched_end | nested
    span: Optional[str]
    message: str


@dataclass
class ParseResult:
    ok: bool
    spans: Optional[FourSpans]
    errors: list[SpanError] = field(default_factory=list)
    # First occurrence of each span that was properly opened and closed (even when the whole answer fails):
    # lets the graded format reward and the emotion reward look inside partially-correct answers.
    found: dict[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(e.message for e in self.errors) if self.errors else "ok"


def _tags(text: str, notation: str):
    """Yield (start, end, name, is_begin) for every span tag of the chosen notation."""
    if notation == "auto":
        notation = "xml" if (_XML_TAG.search(text) and not _KARDIA_TAG.search(text)) else "kardia"
    if notation == "kardia":
        for m in _KARDIA_TAG.finditer(text):
            yield m.start(), m.end(), m.group(1), m.group(2) == "begin"
    elif notation == "xml":
        for m in _XML_TAG.finditer(text):
            yield m.start(), m.end(), m.group(2), m.group(1) == ""
    else:
        raise ValueError(f"unknown span notation {notation!r}; expected one of {SPAN_NOTATIONS}")


def _snippet(s: str, n: int = 40) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def parse_spans(text: str, notation: str = "kardia") -> ParseResult:
    """Parse `text` strictly into four spans, or report every reason it is malformed."""
    errors: list[SpanError] = []
    closed: list[tuple[str, str]] = []  # (name, content) in order of appearance
    open_name, open_at, cursor = None, 0, 0
    for start, end, name, is_begin in _tags(text, notation):
        if open_name is None:
            outside = text[cursor:start]
            if outside.strip():
                errors.append(SpanError("outside_text", None, f"text outside spans: {_snippet(outside)!r}"))
            if is_begin:
                open_name, open_at = name, end
            else:
                errors.append(SpanError("unmatched_end", name, f"'{name}' end tag without a begin tag"))
            cursor = end
        elif is_begin:
            errors.append(SpanError("nested", name, f"'{name}' begins inside unclosed '{open_name}'"))
        elif name != open_name:
            errors.append(SpanError("nested", name, f"'{name}' end tag inside unclosed '{open_name}'"))
        else:
            closed.append((name, text[open_at:start]))
            open_name, cursor = None, end
    if open_name is not None:
        errors.append(SpanError("unclosed", open_name, f"'{open_name}' is never closed"))
    elif text[cursor:].strip():
        errors.append(SpanError("outside_text", None, f"text outside spans: {_snippet(text[cursor:])!r}"))

    found: dict[str, str] = {}
    counts = {n: 0 for n in SPAN_NAMES}
    for name, content in closed:
        counts[name] += 1
        found.setdefault(name, content.strip())
    for name in SPAN_NAMES:
        if counts[name] == 0 and name != open_name:
            errors.append(SpanError("missing", name, f"'{name}' span is missing"))
        elif counts[name] > 1:
            errors.append(SpanError("duplicated", name, f"'{name}' span appears {counts[name]} times"))
    for name, content in found.items():
        if not content:
            errors.append(SpanError("empty", name, f"'{name}' span is empty"))
    order = [n for n, _ in closed if counts[n] == 1]
    expected = [n for n in SPAN_NAMES if n in order]
    if order != expected:
        errors.append(SpanError("out_of_order", None,
                                f"spans out of order: {' -> '.join(order)} (expected {' -> '.join(expected)})"))
    ok = not errors
    return ParseResult(ok, FourSpans(**found) if ok else None, errors, found)


def strip_span_tags(text: str) -> str:
    """`text` with every span tag of both notations replaced by a space and whitespace runs collapsed, so
    `<|emotion_end|><|response_begin|>` between two words never glues them together."""
    return " ".join(SPAN_TAG.sub(" ", text).split())


def visible_response(result: ParseResult, text: str) -> str:
    """What a user would read of an answer: its closed response span (even an empty one: the answer said
    nothing to the user), else, when no response span was closed, the whole text with the tags stripped
    (never the reasoning of an answer whose response span is merely empty)."""
    response = result.found.get("response")
    return strip_span_tags(text) if response is None else response


def render_spans(understanding: str, reasoning: str, emotion: str, response: str) -> str:
    """The canonical four-span string (the SFT target and what the parser accepts)."""
    parts = dict(understanding=understanding, reasoning=reasoning, emotion=emotion, response=response)
    return "".join(f"<|{n}_begin|>{parts[n]}<|{n}_end|>" for n in SPAN_NAMES)
