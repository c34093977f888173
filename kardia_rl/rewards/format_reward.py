"""Format reward: does the answer follow the four-span structure?

Both modes read the strict parser (`kardia_rl.format.parse_spans`), the single source of truth for a
well-formed answer, so the reward, the data validator and the evaluation can never disagree.

- `strict` (the paper): 1.0 for a well-formed answer, else 0.0.
- `graded`: partial credit for partially correct structure, useful early in RL when almost no candidate is
  fully well-formed and a strict 0/1 reward has zero variance within most groups:
    * +0.25 for each of the four spans that is closed, appears exactly once and is non-empty;
    * -0.25 once if the spans are out of order;
    * -0.125 for each structural error (text outside the spans, an unmatched end tag, a nested tag, an
      unclosed span);
    * clamped to [0, 0.75] for any answer with at least one error, so 1.0 is reached iff strict gives 1.0
      (the graded reward never rewards a malformed answer as much as a correct one).
"""
from __future__ import annotations

from kardia_rl.config.schema import FORMAT_MODES
from kardia_rl.format.spans import SPAN_NAMES, ParseResult, parse_spans

SPAN_CREDIT = 0.25
ORDER_PENALTY = 0.25
STRUCTURE_PENALTY = 0.125
MALFORMED_CAP = 0.75
_STRUCTURAL = ("outside_text", "unmatched_end", "nested", "unclosed")


def graded_format_score(result: ParseResult) -> float:
    """Partial-credit score of a parse result (see the module docstring for the rule)."""
    if result.ok:
        return 1.0
    bad_spans = {e.span for e in result.errors if e.code in ("duplicated", "empty")}
    credit = SPAN_CREDIT * sum(1 for n in SPAN_NAMES if n in result.found and n not in bad_spans)
    penalty = ORDER_PENALTY * any(e.code == "out_of_order" for e in result.errors)
    penalty += STRUCTURE_PENALTY * sum(1 for e in result.errors if e.code in _STRUCTURAL)
    return min(MALFORMED_CAP, max(0.0, credit - penalty))


def format_score(result: ParseResult, mode: str = "strict") -> float:
    """Format reward of an already-parsed answer (lets callers parse once and reuse the result)."""
    if mode == "strict":
        return 1.0 if result.ok else 0.0
    if mode == "graded":
        return graded_format_score(result)
    raise ValueError(f"unknown format reward mode {mode!r}; expected one of {FORMAT_MODES}")


def format_reward(text: str, mode: str = "strict", notation: str = "kardia") -> float:
    """Format reward of a raw completion in [0, 1]."""
    if mode not in FORMAT_MODES:
        raise ValueError(f"unknown format reward mode {mode!r}; expected one of {FORMAT_MODES}")
    return format_score(parse_spans(text, notation), mode)
