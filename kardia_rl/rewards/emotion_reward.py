"""Emotion reward: the predicted label (the answer's emotion span) against the sample's gold `emotion`.

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

import re
from typing import Optional, Sequence

from kardia_rl.data.emotions import EMOTIONS_32, normalize_emotion
from kardia_rl.format.spans import parse_spans

EMOTION_MODES = ("exact", "soft")
SAME_CLUSTER_CREDIT = 0.5
_ANY_SPAN_TAG = re.compile(r"<\|?/?(?:understanding|reasoning|emotion|response)(?:_begin|_end)?\|?>")

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


def emotion_similarity(a: Optional[str], b: Optional[str]) -> float:
    """Soft similarity of two canonical labels: 1 equal, SAME_CLUSTER_CREDIT same cluster, else 0."""
    if a is None or b is None:
        return 0.0
    if a == b:
        return 1.0
    ca, cb = CLUSTER_OF.get(a), CLUSTER_OF.get(b)
    return SAME_CLUSTER_CREDIT if ca is not None and ca == cb else 0.0


def predicted_emotion(text_or_label: Optional[str], labels: Sequence[str] = EMOTIONS_32,
                      notation: str = "kardia") -> Optional[str]:
    """Canonical predicted label: the emotion span of a four-span answer (its first closed emotion span,
    even when the answer is otherwise malformed; the format reward punishes the structure), or the text
    itself when it has no span tags (a bare label)."""
    if text_or_label is None:
        return None
    res = parse_spans(text_or_label, notation)
    if "emotion" in res.found:
        return normalize_emotion(res.found["emotion"], labels)
    if _ANY_SPAN_TAG.search(text_or_label):
        return None  # a span answer without a closed emotion span: no prediction
    return normalize_emotion(text_or_label, labels)


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


def emotion_reward(text_or_label: Optional[str], gold: Optional[str], mode: str = "exact",
                   labels: Sequence[str] = EMOTIONS_32, notation: str = "kardia") -> float:
    """Emotion reward in [0, 1] of a completion (or bare label) against the gold label."""
    return emotion_score(predicted_emotion(text_or_label, labels, notation), gold, mode, labels)
