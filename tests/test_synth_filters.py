"""The synthesis drop filters (kardia_rl/synth/filters.py): each drops what it should, clean dialogues stay.

Fast and Ray-free: the rule filters run on crafted records; the embedding ones (unsafe user turns, near
duplicates) load the offline MiniLM once (about 5 s)."""
import copy
import json
import os
from importlib import resources

import pytest

from kardia_rl.config import load_config
from kardia_rl.data.emotions import EMOTIONS_32
from kardia_rl.format.spans import render_spans
from kardia_rl.rewards.emotion_reward import CLUSTER_VALENCE, EMOTION_CLUSTERS
from kardia_rl.synth.filters import (
    DROP_REASONS, apply_filters, emotion_distance, emotion_jump, identity_drift, stated_identity,
    structural_degradation,
)

CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "tiny.yaml")


def _sample_records() -> list[dict]:
    root = resources.files("kardia_rl") / "resources" / "sample_data"
    return [json.loads(line) for name in ("train.jsonl", "test.jsonl")
            for line in (root / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return _sample_records()


@pytest.fixture
def clean(samples) -> dict:
    """The first bundled dialogue (INFJ, 31-year-old librarian, situation about "She"; three turns, 'surprised')."""
    rec = copy.deepcopy(samples[0])
    rec["id"] = "clean"
    return rec


def _cfg(*overrides):
    return load_config(CONF, list(overrides))


def _set_user(rec: dict, turn: int, text: str) -> dict:
    users = [m for m in rec["messages"] if m["role"] == "user"]
    users[turn]["content"] = text
    return rec


def _set_emotion(rec: dict, turn: int, label: str) -> dict:
    a = [m for m in rec["messages"] if m["role"] == "assistant"][turn]
    a["content"] = render_spans("She is moved.", "The news matters to her.", label, "That sounds like a lot.")
    return rec


def test_bundled_dialogues_pass_every_rule_filter(samples):
    # 96 hand-written dialogues with profiles stating MBTI, age and occupation: no false drop
    for rec in samples:
        assert structural_degradation(rec, EMOTIONS_32) is None
        assert identity_drift(rec) is None, rec["anon_username"]
        assert emotion_jump(rec, EMOTIONS_32) is None, rec["anon_username"]


def test_structure_drops_a_broken_or_unlabelled_assistant_turn(clean):
    assert structural_degradation(clean, EMOTIONS_32) is None
    broken = copy.deepcopy(clean)
    a = [m for m in broken["messages"] if m["role"] == "assistant"][1]
    a["content"] = a["content"].replace("<|response_end|>", "")
    assert "assistant turn 1" in structural_degradation(broken, EMOTIONS_32)
    unknown = _set_emotion(copy.deepcopy(clean), 2, "bewildered")
    assert "not in the label set" in structural_degradation(unknown, EMOTIONS_32)


def test_stated_identity_reads_first_person_statements_only():
    s = stated_identity("I'm a 31-year-old librarian in a small town. My name is Ana. I'm a fan of the teacher.")
    assert s["age"] == {31} and s["occupation"] == {"librarian"} and s["name"] == {"ana"}
    assert stated_identity("My boss is an ESTJ and my sister is a nurse, 45 years old.") == \
        {"mbti": set(), "age": set(), "gender": set(), "name": set(), "occupation": set()}
    s = stated_identity("I'm a single mom and I work as a high school teacher. As an ENTP, i'm 30, and I'm 5 min late")
    assert s == {"mbti": {"ENTP"}, "age": {30}, "gender": {"female"}, "name": set(), "occupation": {"teacher"}}


@pytest.mark.parametrize("text,what", [
    ("As an ENTP I never expected this.", "mbti"),
    ("I'm 45 and still surprised by this.", "age"),
    ("As a father of two I never have time to write.", "gender"),  # the situation says "She"
    ("I work as a nurse, so poems are my only quiet time.", "occupation"),
])
def test_identity_drift_drops_a_contradiction_of_the_profile(clean, text, what):
    assert identity_drift(clean) is None
    why = identity_drift(_set_user(clean, 1, text))
    assert why is not None and what in why and "user turn 1" in why


@pytest.mark.parametrize("text", [
    "I'm 30, and honestly I had to read it three times.",  # within synth.identity_age_tolerance of 31
    "My name is Ana, by the way, and my boss is an ESTJ.",  # the profile states no name; another's type
    "I'm a librarian, I shelve poems all day and never send mine.",  # the profile's own occupation
])
def test_identity_drift_keeps_statements_the_profile_allows(clean, text):
    assert identity_drift(_set_user(clean, 1, text)) is None


def test_emotion_distance_scale_and_every_cluster_has_a_valence():
    assert set(CLUSTER_VALENCE) == set(EMOTION_CLUSTERS)
    assert set(CLUSTER_VALENCE.values()) == {"negative", "positive"}
    assert emotion_distance("afraid", "terrified") == 0
    assert emotion_distance("afraid", "sad") == 1
    assert emotion_distance("devastated", "joyful") == 2
    assert emotion_distance("devastated", "calm") is None  # outside the table: no distance


def test_emotion_jump_drops_valence_flips_between_consecutive_turns(clean):
    assert emotion_jump(_set_emotion(copy.deepcopy(clean), 1, "excited"), EMOTIONS_32) is None  # same cluster
    assert emotion_jump(_set_emotion(copy.deepcopy(clean), 1, "hopeful"), EMOTIONS_32) is None  # same valence
    flip = _set_emotion(copy.deepcopy(clean), 1, "devastated")
    assert "'surprised' -> 'devastated'" in emotion_jump(flip, EMOTIONS_32)
    assert emotion_jump(flip, EMOTIONS_32, max_jump=2) is None
    assert "distance 1" in emotion_jump(_set_emotion(copy.deepcopy(clean), 1, "hopeful"), EMOTIONS_32, max_jump=0)


UNSAFE = "I'm going to slash his tires tonight and make him pay for what he did."


def _paraphrase(rec: dict, rid: str) -> dict:
    dup = copy.deepcopy(rec)
    dup["id"] = rid
    return _set_user(dup, 0, "I opened an email today from a literary journal I sent a poem to last winter and had "
                             "forgotten about. They want to publish it! I read it three times.")


def test_apply_filters_drops_each_reason_once_and_keeps_clean_dialogues(samples, clean):
    others = [dict(copy.deepcopy(r), id=f"s{i}") for i, r in enumerate(samples[80:86])]  # distinct dialogues
    bad_structure = _set_emotion(dict(copy.deepcopy(clean), id="structure"), 0, "bewildered")
    drift = _set_user(dict(copy.deepcopy(clean), id="drift"), 2, "I'm 45 and I still can't believe it.")
    jump = _set_emotion(dict(copy.deepcopy(clean), id="jump"), 2, "furious")
    unsafe = _set_user(dict(copy.deepcopy(samples[10]), id="unsafe"), 1, UNSAFE)
    dup = _paraphrase(clean, "dup")
    records = [clean, *others, bad_structure, drift, jump, unsafe, dup]
    why: list = []
    kept, counts = apply_filters(records, _cfg(), reasons=why)
    assert [r["id"] for r in kept] == ["clean", *[r["id"] for r in others]]
    assert counts == {"structure": 1, "identity_drift": 1, "emotion_jump": 1, "unsafe_user": 1, "near_duplicate": 1}
    assert set(counts) == set(DROP_REASONS)
    assert {(rid, reason) for rid, reason, _ in why} == {
        ("structure", "structure"), ("drift", "identity_drift"), ("jump", "emotion_jump"),
        ("unsafe", "unsafe_user"), ("dup", "near_duplicate")}
    assert next(d for rid, _, d in why if rid == "dup") == "similar to record clean"


def test_thresholds_come_from_the_config(samples, clean):
    unsafe = _set_user(dict(copy.deepcopy(samples[10]), id="unsafe"), 1, UNSAFE)
    records = [clean, _paraphrase(clean, "dup"), unsafe]
    kept, counts = apply_filters(records, _cfg("synth.near_dup_threshold=1.0", "synth.min_user_safety=1.0"))
    assert [r["id"] for r in kept] == ["clean", "dup", "unsafe"] and sum(counts.values()) == 0


def test_a_dropped_record_does_not_shadow_its_near_duplicate(clean):
    # the first copy is dropped for identity drift; its near twin is then the first of its kind and stays
    first = _set_user(dict(copy.deepcopy(clean), id="first"), 2, "As an ESTP I never expected this.")
    twin = _paraphrase(clean, "twin")
    kept, counts = apply_filters([first, twin], _cfg())
    assert [r["id"] for r in kept] == ["twin"] and counts["identity_drift"] == 1 and counts["near_duplicate"] == 0


@pytest.mark.parametrize("override,message", [
    ("synth.max_emotion_jump=3", "synth.max_emotion_jump: must be in [0, 2], got 3"),
    ("synth.min_user_safety=0.5", "synth.min_user_safety: must be in [1, 5]"),
    ("synth.identity_age_tolerance=-1", "synth.identity_age_tolerance: must be >= 0"),
])
def test_filter_thresholds_out_of_range_are_config_errors(override, message):
    from kardia_rl.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _cfg(override)
    assert message in str(e.value)
