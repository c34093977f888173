"""Emotion reward: the predicted label (the answer's emotion span) against the sample's gold `emotion`.

Credit comes ONLY from an emotion span the structure accepts (`credited_emotion`), decided by the same
parser and mode as the format reward:
- `format_mode="strict"`: the whole answer must be well-formed; a malformed answer predicts nothing, even
  when it contains a closed emotion span;
- `format_mode="graded"`: the emotion span itself must be well-formed: closed, exactly once, non-empty and
  with no span tag inside it (the rest of the answer may be broken; the format reward grades that).
A bare label ("sad") or a label outside an emotion span is never a prediction. Why: otherwise a policy
collects 1/3 of the unified reward by emitting the label alone and abandoning the format (or appending an
emotion span to junk), and the eval's Emotion Acc would credit answers its Format column rejects.

Both sides go through `normalize_emotion`, so "Anxiety", "feeling anxious." and "ANXIOUS" all match
"anxious"; a label outside the active set never matches (an unknown word earns nothing).

- `exact` (the paper): 1.0 when the normalised labels are equal, else 0.0.
- `soft`: 1.0 for an exact match, `SAME_CLUSTER_CREDIT` (0.5) when both labels sit in the same fine
  cluster of `EMOTION_CLUSTERS`, else 0.0. Clusters only give credit between the 32 EmpatheticDialogues
  labels; with a custom label set, labels outside the table fall back to exact matching.

Why these clusters: EmpatheticDialogues (Rashkin et al., 2019) built its 32 labels from several emotion
taxonomies, and its own confusion analysis shows that classifiers mostly confuse labels that share
valence, arousal and the object of the appraisal (afraid/terrified/anxious/apprehensive, angry/furious/
annoyed, ...). The table groups labels that differ mainly in intensity or in timing but share valence and
appraisal target, so a near-miss on intensity ("afraid" for "terrified") earns partial credit while a
valence error ("joyful" for "devastated") earns nothing. Different-valence labels never share a cluster,
so the soft reward cannot be gamed by always answering a generic label of the right polarity.
"""
from __future__ import annotations

from typing import Optional, Sequence

from kardia_rl.config.schema import EMOTION_MODES, FORMAT_MODES
from kardia_rl.data.emotions import EMOTIONS_32, normalize_emotion
from kardia_rl.format.spans import SPAN_TAG, ParseResult, parse_spans

SAME_CLUSTER_CREDIT = 0.5

# Fine clusters over the 32 labels (each label exactly once; a test checks the partition).
EMOTION_CLUSTERS: dict[str, tuple[str, ...]] = {
    # negative valence
    "fear": ("afraid", "terrified", "anxious", "apprehensive"),  # threat appraisal; intensity/timing differ
    "anger": ("angry", "furious", "annoyed"),  # blame on another; intensity differs
    "sadness": ("sad", "devastated", "lonely", "disappointed"),  # loss or unmet hope, low arousal
    "self_conscious": ("guilty", "ashamed", "embarrassed"),  # negative appraisal of one's own act or self
    "aversion": ("disgusted", "jealous"),  # negative appraisal of another's conduct or fortune
    # positive valence
    "elation": ("excited", "joyful", "surprised"),  # high-arousal positive (ED's "surprised" is mostly positive)
    "forward_looking": ("anticipating", "hopeful", "prepared", "confident"),  # positive, about the future
    "esteem": ("proud", "impressed"),  # positive appraisal of an achievement (own or another's)
    "affiliation": ("grateful", "caring", "trusting", "faithful"),  # warmth toward others
    "reflective": ("content", "nostalgic", "sentimental"),  # low-arousal positive, often about the past
}
CLUSTER_OF: dict[str, str] = {label: c for c, labels in EMOTION_CLUSTERS.items() for label in labels}
# Valence of each cluster (the two halves of the table above); the synthesis emotion-jump filter measures how
# far consecutive labels are: same cluster < same valence < opposite valence.
CLUSTER_VALENCE: dict[str, str] = {
    **dict.fromkeys(("fear", "anger", "sadness", "self_conscious", "aversion"), "negative"),
    **dict.fromkeys(("elation", "forward_looking", "esteem", "affiliation", "reflective"), "positive"),
}


def emotion_similarity(a: Optional[str], b: Optional[str]) -> float:
    """Soft similarity of two canonical labels: 1 equal, SAME_CLUSTER_CREDIT same cluster, else 0."""
    if a is None or b is None:
        return 0.0
    if a == b:
        return 1.0
    ca, cb = CLUSTER_OF.get(a), CLUSTER_OF.get(b)
    return SAME_CLUSTER_CREDIT if ca is not None and ca == cb else 0.0


def credited_emotion(result: ParseResult, labels: Sequence[str] = EMOTIONS_32,
                     format_mode: str = "strict") -> Optional[str]:
    """Canonical predicted label of a parsed answer, or None when no emotion span may earn credit
    (see the module docstring for the strict and graded rules)."""
    if format_mode not in FORMAT_MODES:
        raise ValueError(f"unknown format mode {format_mode!r}; expected one of {FORMAT_MODES}")
    if format_mode == "strict":
        return normalize_emotion(result.spans.emotion, labels) if result.ok else None
    span = result.found.get("emotion")
    if span is None or any(e.span == "emotion" for e in result.errors):  # duplicated, empty, nested, unclosed
        return None
    if SPAN_TAG.search(span):  # a tag of either notation swallowed by the span: not a label
        return None
    return normalize_emotion(span, labels)


def predicted_emotion(text: Optional[str], labels: Sequence[str] = EMOTIONS_32, notation: str = "kardia",
                      format_mode: str = "strict") -> Optional[str]:
    """Canonical predicted label of a raw completion under `credited_emotion`'s rule."""
    if not isinstance(text, str):
        return None
    return credited_emotion(parse_spans(text, notation), labels, format_mode)


def emotion_score(predicted: Optional[str], gold: Optional[str], mode: str = "exact",
                  labels: Sequence[str] = EMOTIONS_32) -> float:
    """Reward of an already-normalised prediction against the gold label (normalised here)."""
    if mode not in EMOTION_MODES:
        raise ValueError(f"unknown emotion reward mode {mode!r}; expected one of {EMOTION_MODES}")
    g = normalize_emotion(gold, labels)
    if predicted is None or g is None:
        return 0.0
    if mode == "exact":
        return 1.0 if predicted == g else 0.0
    return emotion_similarity(predicted, g)


def emotion_reward(text: Optional[str], gold: Optional[str], mode: str = "exact",
                   labels: Sequence[str] = EMOTIONS_32, notation: str = "kardia", format_mode: str = "strict") -> float:
    """Emotion reward in [0, 1] of a completion against the gold label (0 without a credited emotion span)."""
    return emotion_score(predicted_emotion(text, labels, notation, format_mode), gold, mode, labels)
