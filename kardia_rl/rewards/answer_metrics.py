"""Metrics of scored answers (one answer per held-out sample): the rows and one pure function of them.

`sample_row` builds one row per answer and `recompute_metrics(rows)` is the ONLY place the numbers are
computed, for the evaluation report (evaluation/harness.py writes the rows to samples_<name>.jsonl, so
metrics.json can be recomputed from that file; the tests recount the headline numbers independently) and
for validation during GRPO (trainer/validation.py logs them as val/*). They live here, below both rooms,
so eval's table and the val/* curve share one definition per number.

Definitions (each row is one generated answer to one held-out sample; see sample_row):
- format_valid_rate: fraction of answers the strict four-span parser accepts;
- emotion_accuracy: fraction whose predicted label equals the gold label exactly, whatever
  reward.emotion_mode and reward.format_mode are. The predicted label is the emotion span of a WELL-FORMED
  answer only (emotion_reward.credited_emotion, strict rule), so a malformed answer or a bare label is never
  correct and emotion_accuracy <= format_valid_rate; per_emotion groups it by the GOLD label;
- dims[d].mean: mean 1-5 judge score over ALL n answers, so every model is compared on the same samples. An
  answer without a score on d (malformed and not judged, or a failed judgment) counts at the scale floor
  RUBRIC_FLOOR = 1, the rubric score of the worst answer; a model that breaks the format on hard cases cannot
  look better by leaving them out. With judge.judge_malformed=true malformed answers are judged instead.
  None when a well-formed answer was not judged at all (the judge is off: reward.rubric_weight=0);
  dims[d].normalized = (mean - 1) / 4; dims[d].scored = answers the judge scored on d and scored_mean their
  mean (diagnostics only: the judged subsets of two models differ);
- judged_rate: fraction of answers the judge was asked about (the rubric columns' coverage);
- reward_mean (and format/emotion/rubric component means): the unified reward as trained on;
- distinct_1/2: corpus-level distinct-n (Li et al. 2016): unique n-grams / all n-grams over the response
  texts of all answers; tokens are whitespace-separated words, lower-cased; None when there is no n-gram;
- response_len_mean: mean number of words of the response text. The response text is the response span,
  or, for an answer without a closed response span (e.g. a base model that never learned the tags), the
  whole answer with span tags removed: what a user would be shown;
- judge counts: judged (the judge was asked), judge_failures (it gave no usable judgment), fallbacks.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from kardia_rl.data.emotions import EMOTIONS_32
from kardia_rl.format.spans import SPAN_NAMES, ParseResult, parse_spans, visible_response
from kardia_rl.rewards.emotion_reward import credited_emotion
from kardia_rl.rewards.judge.base import DIMENSIONS

REWARD_PARTS = ("total", "format", "emotion", "rubric")
RUBRIC_FLOOR = 1.0  # the lowest score of the 1-5 rubric scale


def words(text: str) -> list[str]:
    return (text or "").lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> Optional[float]:
    """Unique n-grams / total n-grams over all texts (corpus level); None when there is no n-gram."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _emotion_correct(row: dict) -> bool:
    """Correct only for a well-formed answer, re-checked here so an old or hand-edited samples file counts the
    same way as the harness's rows."""
    return bool(row["emotion_correct"]) and bool(row["format_valid"])


def recompute_metrics(rows: Sequence[dict]) -> dict:
    """Every number of the evaluation report for one model, from its sample rows (sample_row)."""
    n = len(rows)
    if n == 0:
        raise ValueError("recompute_metrics: no sample rows")
    correct = _emotion_correct
    per_emotion: dict[str, dict] = {}
    for gold, count in sorted(Counter(r["gold_emotion"] for r in rows).items()):
        n_correct = sum(1 for r in rows if r["gold_emotion"] == gold and correct(r))
        per_emotion[gold] = {"n": count, "correct": n_correct, "accuracy": n_correct / count}
    dims = {}
    # a well-formed answer the judge was never asked about (reward.rubric_weight=0) has no rubric to floor
    judge_off = any(r["format_valid"] and not r["judged"] for r in rows)
    for d in DIMENSIONS:
        scored = [float(r["scores"][d]) for r in rows if r["scores"].get(d) is not None]
        mean = None if judge_off else (sum(scored) + RUBRIC_FLOOR * (n - len(scored))) / n
        dims[d] = {"mean": mean, "normalized": None if mean is None else (mean - 1.0) / 4.0, "n": n,
                   "scored": len(scored), "scored_mean": _mean(scored)}
    responses = [r["response_text"] for r in rows]
    out = {
        "n": n,
        "format_valid": sum(bool(r["format_valid"]) for r in rows),
        "format_valid_rate": sum(bool(r["format_valid"]) for r in rows) / n,
        "emotion_correct": sum(correct(r) for r in rows),
        "emotion_accuracy": sum(correct(r) for r in rows) / n,
        "emotion_predicted_rate": sum(r["predicted_emotion"] is not None for r in rows) / n,
        "per_emotion": per_emotion,
        "dims": dims,
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "response_len_mean": sum(len(words(t)) for t in responses) / n,
        "completion_tokens_mean": sum(int(r["completion_tokens"]) for r in rows) / n,
        "truncated_rate": sum(r["finish_reason"] == "length" for r in rows) / n,
        "judged": sum(bool(r["judged"]) for r in rows),
        "judged_rate": sum(bool(r["judged"]) for r in rows) / n,
        "judge_failures": sum(bool(r["judge_failed"]) for r in rows),
        "fallbacks": sum(bool(r["fallback"]) for r in rows),
    }
    for part in REWARD_PARTS:
        key = "reward_mean" if part == "total" else f"reward_{part}_mean"
        out[key] = sum(float(r["reward"][part]) for r in rows) / n
    return out


def spans_and_response(completion: str, notation: str, res: Optional[ParseResult] = None) -> tuple[bool, dict, str]:
    """(format ok, the four spans (None when missing), the response text a user would see)."""
    res = res if res is not None else parse_spans(completion, notation)
    spans = {name: res.found.get(name) for name in SPAN_NAMES}
    return res.ok, spans, visible_response(res, completion)


def sample_row(sample, prompt_text: str, completion, breakdown, model_name: str, notation: str,
               labels: Sequence[str] = EMOTIONS_32) -> dict:
    """One line of samples_<name>.jsonl: everything recompute_metrics needs, plus what a reader wants.

    predicted_emotion is the table's (strict rule: only a well-formed answer predicts a label), whatever
    reward.format_mode gave the training reward (reward.emotion holds that)."""
    res = parse_spans(completion.text, notation)
    ok, spans, response = spans_and_response(completion.text, notation, res)
    predicted = credited_emotion(res, labels, "strict")
    return {
        "id": sample.id, "model": model_name, "dialogue_id": sample.dialogue_id, "turn": sample.turn,
        "prompt": prompt_text, "completion": completion.text, "finish_reason": completion.finish_reason,
        "completion_tokens": len(completion.token_ids), "format_valid": ok, "parse_error": breakdown.parse_error,
        "spans": spans, "response_text": response, "predicted_emotion": predicted,
        "gold_emotion": sample.emotion,
        "emotion_correct": predicted is not None and predicted == sample.emotion,
        "scores": {d: breakdown.dims.get(d) for d in DIMENSIONS}, "rationale": dict(breakdown.rationale or {}),
        "judge_response": breakdown.response,
        "reward": {"total": breakdown.total, "format": breakdown.format, "emotion": breakdown.emotion,
                   "rubric": breakdown.rubric},
        "judged": breakdown.judged, "judge_failed": breakdown.judge_failed, "fallback": breakdown.fallback,
        "judge_error": breakdown.judge_error,
    }
