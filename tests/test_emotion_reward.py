"""Emotion reward: label normalisation, the credit rule (only a well-formed emotion span earns credit, strict
and graded) and the soft clusters. Pure Python, well under a second."""
import pytest
from conftest import ans

from kardia_rl.data.emotions import EMOTIONS_32
from kardia_rl.rewards import EMOTION_CLUSTERS, emotion_reward, emotion_similarity, predicted_emotion


def test_emotion_exact_normalises_both_sides():
    assert emotion_reward(ans("Anxiety"), "anxious") == 1.0
    assert emotion_reward(ans("feeling anxious."), "ANXIOUS") == 1.0
    assert emotion_reward(ans("Nervous"), "anxious") == 1.0  # a synonym inside the span
    assert emotion_reward(ans("afraid"), "terrified") == 0.0
    assert emotion_reward(ans("blorp"), "anxious") == 0.0  # unknown label never matches
    assert emotion_reward(ans("anxious"), "not-a-label") == 0.0
    assert emotion_reward(None, "anxious") == 0.0


# A correct label ("sad") in every position that must NOT earn emotion credit under the strict rule.
NO_CREDIT_STRICT = {
    "bare label": "sad",
    "bare synonym": "Unhappy",
    "label outside any span": ans("anxious").replace("<|response_end|>", "<|response_end|> sad"),
    "emotion span then junk": "<|emotion_begin|>sad<|emotion_end|> blah",
    "emotion span alone": "<|emotion_begin|>sad<|emotion_end|>",
    "malformed answer (response unclosed)": ans("sad").replace("<|response_end|>", ""),
    "malformed answer (text outside)": "hello " + ans("sad"),
    "malformed answer (duplicated emotion)": ans("sad") + "<|emotion_begin|>sad<|emotion_end|>",
    "unclosed emotion span": "<|emotion_begin|>sad",
    "label in the response span only": ans("anxious", "You sound sad."),
}


@pytest.mark.parametrize("text", list(NO_CREDIT_STRICT.values()), ids=list(NO_CREDIT_STRICT))
def test_strict_emotion_credit_only_from_a_well_formed_answer(text):
    """Old rule: a bare label, or any closed emotion span of a malformed answer, earned the full reward."""
    assert emotion_reward(text, "sad") == 0.0
    assert emotion_reward(text, "sad", mode="soft") == 0.0
    assert predicted_emotion(text) in (None, "anxious")  # never "sad"
    assert emotion_reward(ans("sad"), "sad") == 1.0  # the well-formed answer with the same label does


def test_graded_emotion_credit_needs_a_well_formed_emotion_span():
    # the emotion span itself is fine, the rest is broken: graded mode credits it (the format reward grades the rest)
    for text in ("<|emotion_begin|>sad<|emotion_end|> blah", ans("sad").replace("<|response_end|>", ""),
                 "hello " + ans("sad")):
        assert emotion_reward(text, "sad", format_mode="graded") == 1.0, text
    # no well-formed emotion span: no credit in graded mode either
    for text in ("sad", "Unhappy", "<|emotion_begin|>sad", ans("sad") + "<|emotion_begin|>sad<|emotion_end|>",
                 "<|emotion_begin|>sad<|response_begin|>x<|emotion_end|>",  # a tag swallowed by the span
                 "<|reasoning_begin|>r <|emotion_begin|>sad<|emotion_end|><|reasoning_end|>",  # nested in another
                 ans("")):
        assert emotion_reward(text, "sad", format_mode="graded") == 0.0, text
    assert emotion_reward(ans("sad"), "sad", format_mode="graded") == 1.0
    with pytest.raises(ValueError, match="format mode"):
        emotion_reward(ans("sad"), "sad", format_mode="loose")


def test_emotion_soft_table():
    assert emotion_reward(ans("afraid"), "terrified", mode="soft") == 0.5
    assert emotion_reward(ans("furious"), "annoyed", mode="soft") == 0.5
    assert emotion_reward(ans("joyful"), "devastated", mode="soft") == 0.0
    assert emotion_reward(ans("sad"), "sad", mode="soft") == 1.0
    assert emotion_similarity("proud", "impressed") == emotion_similarity("impressed", "proud") == 0.5
    # custom label sets: labels outside the table only match exactly
    assert emotion_reward(ans("happy"), "sad", mode="soft", labels=("happy", "sad")) == 0.0
    assert emotion_reward(ans("happy"), "happy", mode="soft", labels=("happy", "sad")) == 1.0


def test_emotion_clusters_partition_the_32_labels_without_mixing_valence():
    flat = [lab for labels in EMOTION_CLUSTERS.values() for lab in labels]
    assert sorted(flat) == sorted(EMOTIONS_32) and len(flat) == len(set(flat)) == 32
    negative = {"afraid", "terrified", "anxious", "apprehensive", "angry", "furious", "annoyed", "sad", "devastated",
                "lonely", "disappointed", "guilty", "ashamed", "embarrassed", "disgusted", "jealous"}
    for name, labels in EMOTION_CLUSTERS.items():
        assert len({lab in negative for lab in labels}) == 1, f"cluster {name} mixes valence"
