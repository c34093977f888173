"""Emotion labels and their normalisation.

The default label set is EmpatheticDialogues' 32 fine-grained emotions, which KardiaBench uses. Model
outputs and user data spell labels in many ways ("Anxiety", "feeling anxious.", "TERRIFIED!"), so every
comparison goes through `normalize_emotion`, which:

1. lower-cases, strips whitespace, surrounding punctuation and quotes, and a leading "feeling"/"i feel"/
   "i am"/"i'm" (models often answer in a sentence);
2. maps known synonyms and inflections to the canonical label (SYNONYMS below: nouns such as "anxiety",
   "anger", "joy", adverbs such as "anxiously", near-synonyms such as "scared" -> "afraid");
3. returns the canonical label if it is in the label set, else None (an unknown label never matches).

A custom label set (config `data.emotion_labels`) replaces the default list; synonyms only apply when they
map onto a label of the active set.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

EMOTIONS_32: tuple[str, ...] = (
    "surprised", "excited", "angry", "proud", "sad", "annoyed", "grateful", "lonely",
    "afraid", "terrified", "guilty", "impressed", "disgusted", "hopeful", "confident", "furious",
    "anxious", "anticipating", "joyful", "nostalgic", "disappointed", "prepared", "jealous", "content",
    "devastated", "embarrassed", "caring", "sentimental", "trusting", "ashamed", "apprehensive", "faithful",
)

# Nouns, adverbs and common near-synonyms -> canonical EmpatheticDialogues label.
SYNONYMS: dict[str, str] = {
    "surprise": "surprised", "shocked": "surprised", "astonished": "surprised", "amazed": "surprised",
    "excitement": "excited", "exciting": "excited", "thrilled": "excited", "eager": "excited",
    "anger": "angry", "mad": "angry", "angered": "angry", "angrily": "angry",
    "pride": "proud", "proudly": "proud",
    "sadness": "sad", "unhappy": "sad", "sadly": "sad", "down": "sad", "sorrowful": "sad",
    "annoyance": "annoyed", "irritated": "annoyed", "irritation": "annoyed", "frustrated": "annoyed",
    "frustration": "annoyed", "annoying": "annoyed",
    "gratitude": "grateful", "thankful": "grateful", "gratefully": "grateful", "thankfulness": "grateful",
    "loneliness": "lonely", "alone": "lonely", "isolated": "lonely",
    "fear": "afraid", "scared": "afraid", "frightened": "afraid", "fearful": "afraid",
    "terror": "terrified", "horrified": "terrified", "petrified": "terrified",
    "guilt": "guilty", "guiltily": "guilty",
    "impressive": "impressed", "admiration": "impressed", "awed": "impressed",
    "disgust": "disgusted", "disgusting": "disgusted", "revulsion": "disgusted",
    "hope": "hopeful", "hopefully": "hopeful", "optimistic": "hopeful",
    "confidence": "confident", "confidently": "confident", "self-assured": "confident",
    "fury": "furious", "furiously": "furious", "enraged": "furious", "rage": "furious", "livid": "furious",
    "anxiety": "anxious", "anxiously": "anxious", "nervous": "anxious", "worried": "anxious",
    "worry": "anxious", "stressed": "anxious", "nervousness": "anxious",
    "anticipation": "anticipating", "anticipate": "anticipating", "anticipatory": "anticipating",
    "joy": "joyful", "happy": "joyful", "happiness": "joyful", "joyous": "joyful", "joyfully": "joyful",
    "nostalgia": "nostalgic", "nostalgically": "nostalgic", "wistful": "nostalgic",
    "disappointment": "disappointed", "disappointing": "disappointed", "let down": "disappointed",
    "preparation": "prepared", "ready": "prepared", "preparedness": "prepared",
    "jealousy": "jealous", "envious": "jealous", "envy": "jealous", "jealously": "jealous",
    "contentment": "content", "contented": "content", "satisfied": "content", "at peace": "content",
    "devastation": "devastated", "heartbroken": "devastated", "crushed": "devastated",
    "embarrassment": "embarrassed", "embarrassing": "embarrassed",
    "care": "caring", "compassionate": "caring", "compassion": "caring", "protective": "caring",
    "sentimentality": "sentimental", "sentimentally": "sentimental", "moved": "sentimental",
    "trust": "trusting", "trustful": "trusting", "trusted": "trusting",
    "shame": "ashamed", "shameful": "ashamed",
    "apprehension": "apprehensive", "apprehensively": "apprehensive", "uneasy": "apprehensive",
    "faith": "faithful", "loyal": "faithful", "loyalty": "faithful", "devoted": "faithful",
}

_PREFIX = re.compile(r"^(?:i am feeling|i'm feeling|im feeling|feeling|i feel|i am|i'm|im|they feel|they are|"
                     r"the user (?:is|feels)|user (?:is|feels)|emotion:|label:)\s+")
_EDGE = re.compile(r"^[\s\"'`“”‘’.,;:!?()\[\]{}*_-]+|[\s\"'`“”‘’.,;:!?()\[\]{}*_-]+$")


def _clean(text: str) -> str:
    t = _EDGE.sub("", text.strip().lower())
    t = re.sub(r"\s+", " ", t)
    t = _PREFIX.sub("", t)
    t = re.sub(r"^(?:very|really|so|quite|a bit|somewhat|deeply|extremely)\s+", "", t)
    return _EDGE.sub("", t)


def normalize_emotion(text: Optional[str], labels: Sequence[str] = EMOTIONS_32) -> Optional[str]:
    """Canonical label for `text` within `labels`, or None when it is not a recognised label."""
    if text is None:
        return None
    t = _clean(str(text))
    allowed = set(labels)
    if t in allowed:
        return t
    mapped = SYNONYMS.get(t)
    if mapped in allowed:
        return mapped
    return None


def label_set(labels: Optional[Iterable[str]] = None) -> tuple[str, ...]:
    """The active label set: `labels` lower-cased and stripped, or the 32 defaults when None/empty."""
    if not labels:
        return EMOTIONS_32
    out = tuple(_clean(x) for x in labels)
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate emotion labels after normalisation: {sorted(out)}")
    return out
