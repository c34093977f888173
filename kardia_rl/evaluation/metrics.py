"""The evaluation metrics, as one pure function of the per-sample rows.

`recompute_metrics(rows)` is the ONLY place the numbers of the report are computed: the harness calls it
on the rows it writes to samples_<name>.jsonl, so metrics.json can be recomputed from that file (the tests
recount the headline numbers independently from the raw completions and judge scores in it).

Definitions (each row is one generated answer to one test sample; see harness.sample_row):
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
    """Every number of the evaluation report for one model, from its sample rows (harness.sample_row)."""
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
