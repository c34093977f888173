import json
import re
import subprocess
import sys

import pytest
from conftest import require

from kardia_rl.data import (EMOTIONS_32, expand_turns, label_set, load_dialogues, normalize_emotion,
                            split_dialogues, validate)
from kardia_rl.errors import DataError
from kardia_rl.format import render_spans

GOOD_ANSWER = render_spans("She is nervous.", "A first exam matters to her.", "anxious", "That sounds stressful. What helps?")


def _record(**kw):
    rec = {"person": "MBTI: INFJ\nAbout: I like tea.", "mbti": "INFJ", "emotion": "anxious",
           "situation": "An exam tomorrow.", "anon_username": "u1",
           "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "I have an exam."},
                        {"role": "assistant", "content": GOOD_ANSWER},
                        {"role": "user", "content": "Yes, tomorrow."}, {"role": "assistant", "content": GOOD_ANSWER}]}
    rec.update(kw)
    return rec


def test_bundled_sample_is_valid_and_covers_all_emotions():
    rep = validate("builtin:sample")
    assert rep.ok, rep.problems[:5]
    s = rep.summary()
    assert s["dialogues"] >= 96 and s["profiles"] >= 24
    assert set(s["emotions"]) == set(EMOTIONS_32) and min(s["emotions"].values()) >= 2
    lens = [sum(m["role"] == "user" for m in d.messages) for d in rep.dialogues]
    assert min(lens) >= 2 and max(lens) <= 6
    train, test = load_dialogues("builtin:sample/train"), load_dialogues("builtin:sample/test")
    assert {d.anon_username for d in train}.isdisjoint({d.anon_username for d in test})


def test_broken_jsonl_reports_every_problem_with_its_line(tmp_path):
    bad_order = _record()
    bad_order["messages"][1], bad_order["messages"][2] = bad_order["messages"][2], bad_order["messages"][1]
    no_spans = _record()
    no_spans["messages"][2]["content"] = "just a reply"
    swapped = _record()
    swapped["messages"][4]["content"] = (
        "<|reasoning_begin|>r<|reasoning_end|><|understanding_begin|>u<|understanding_end|>"
        "<|emotion_begin|>sad<|emotion_end|><|response_begin|>ok<|response_end|>")
    lines = [
        json.dumps(_record()),                                   # 1 valid
        '{"person": "x", "mbti": ',                               # 2 bad JSON
        json.dumps({k: v for k, v in _record().items() if k != "situation"}),  # 3 missing field
        json.dumps(_record(mbti=7)),                              # 4 mistyped
        json.dumps(_record(emotion="melancholic")),               # 5 emotion outside label set
        json.dumps(bad_order),                                    # 6 roles out of order
        json.dumps(no_spans),                                     # 7 assistant without spans
        json.dumps(swapped),                                      # 8 spans out of order
        "",                                                       # 9 blank: ignored
        json.dumps(_record(messages=[{"role": "system", "content": "s"}, {"role": "bot", "content": "hi"}])),  # 10
    ]
    p = tmp_path / "broken.jsonl"
    p.write_text("\n".join(lines) + "\n")
    rep = validate(str(p))
    probs = "\n".join(rep.problems)
    assert len(rep.dialogues) == 1
    expect = [
        f"{p}:2: record: invalid JSON",
        f"{p}:3: situation: missing required field",
        f"{p}:4: mbti: expected a string, got int",
        f"{p}:5: emotion: 'melancholic' is not in the label set",
        f"{p}:6: messages[1].role: roles out of order: expected 'user', got 'assistant'",
        f"{p}:7: messages[2].content: text outside spans: 'just a reply'",
        f"{p}:7: messages[2].content: 'understanding' span is missing",
        f"{p}:8: messages[4].content: spans out of order: reasoning -> understanding -> emotion -> response",
        f"{p}:10: messages[1].role: unknown role 'bot'",
    ]
    for e in expect:
        assert e in probs, f"missing: {e}\n--- got:\n{probs}"
    assert not any(x.startswith(f"{p}:1:") or x.startswith(f"{p}:9:") for x in rep.problems)
    with pytest.raises(DataError, match="problem"):
        load_dialogues(str(p))


def test_cli_validate_data_exit_codes(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps(_record(emotion="??")) + "\n" + json.dumps(_record(anon_username=3)) + "\n")
    out = subprocess.run([sys.executable, "-m", "kardia_rl.cli", "validate-data", str(p)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stdout.splitlines() == [f"{p}:1: emotion: '??' is not in the label set",
                                       f"{p}:2: anon_username: expected a string, got int"]
    ok = subprocess.run([sys.executable, "-m", "kardia_rl.cli", "validate-data", "builtin:sample", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["turns"] == 346
    missing = subprocess.run([sys.executable, "-m", "kardia_rl.cli", "validate-data", str(tmp_path / "no.jsonl")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "file not found" in missing.stderr and "Traceback" not in missing.stderr


def test_json_parquet_and_saved_dataset_sources(tmp_path):
    recs = [_record(), _record(anon_username="u2"), _record(emotion="bad")]
    jp = tmp_path / "d.json"
    jp.write_text(json.dumps(recs, indent=2))
    rep = validate(str(jp))
    assert len(rep.dialogues) == 2 and len(rep.problems) == 1
    line = rep.problems[0].split(":")[1]
    text = jp.read_text().splitlines()
    assert text[int(line) - 1].strip() == "{", "line must point at the start of the third record"
    datasets = require("datasets")
    ds = datasets.Dataset.from_list(recs[:2])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_dialogues(str(tmp_path / "d.parquet"))) == 2
    assert len(load_dialogues(str(tmp_path / "saved"))) == 2
    assert len(load_dialogues(str(tmp_path / "dd"), split="test")) == 1
    with pytest.raises(DataError, match="not 'nope'"):
        load_dialogues(str(tmp_path / "dd"), split="nope")


def test_per_turn_expansion_counts(sample_dialogues):
    total = 0
    for d in sample_dialogues:
        turns = expand_turns(d)
        n_assist = sum(m["role"] == "assistant" for m in d.messages)
        assert len(turns) == n_assist
        for k, t in enumerate(turns):
            assert t.turn == k and t.history[-1]["role"] == "user" and t.emotion == d.emotion
            assert sum(m["role"] == "user" for m in t.history) == k + 1
            assert t.target == [m for m in d.messages if m["role"] == "assistant"][k]["content"]
        total += len(turns)
    assert total == 346


@pytest.mark.parametrize("by", ["dialogue", "profile"])
def test_splits_disjoint_complete_deterministic(sample_dialogues, by):
    s = split_dialogues(sample_dialogues, 0.15, 0.1, seed=3, by=by)
    ids = {k: {d.id for d in v} for k, v in s.items()}
    assert ids["train"].isdisjoint(ids["validation"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["validation"].isdisjoint(ids["test"])
    assert sum(map(len, ids.values())) == len(sample_dialogues) == len(set().union(*ids.values()))
    turn_ids = {k: {t.id for d in v for t in expand_turns(d)} for k, v in s.items()}
    assert turn_ids["train"].isdisjoint(turn_ids["validation"])  # a dialogue never spans splits
    again = split_dialogues(list(reversed(sample_dialogues)), 0.15, 0.1, seed=3, by=by)
    assert {k: {d.id for d in v} for k, v in again.items()} == ids  # order-independent
    other = split_dialogues(sample_dialogues, 0.15, 0.1, seed=4, by=by)
    assert {d.id for d in other["test"]} != ids["test"]
    if by == "profile":
        users = {k: {d.anon_username for d in v} for k, v in s.items()}
        assert users["train"].isdisjoint(users["test"]) and users["train"].isdisjoint(users["validation"])


@pytest.mark.parametrize("raw, want", [
    ("Anxious", "anxious"), ("  anxiety. ", "anxious"), ("I feel SCARED!", "afraid"), ("terrified", "terrified"),
    ("feeling very nostalgic", "nostalgic"), ("joy", "joyful"), ("'Grateful'", "grateful"), ("envy", "jealous"),
    ("melancholic", None), ("", None), (None, None),
])
def test_emotion_normalisation(raw, want):
    assert normalize_emotion(raw) == want


def test_custom_label_set():
    labels = label_set(["Happy", "Sad"])
    assert normalize_emotion("sad", labels) == "sad" and normalize_emotion("anxious", labels) is None
    with pytest.raises(ValueError):
        label_set(["sad", "Sad "])


def test_one_jsonl_reader_names_the_file_and_line(tmp_path):
    from kardia_rl.data.sources import iter_jsonl, read_jsonl

    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_jsonl(str(p))) == [(1, {"a": 1}), (3, {"a": 2})]  # blank lines skipped, numbers kept
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=re.escape(f"{p}:2: invalid JSON")):
        read_jsonl(str(p))
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=re.escape(f"{p}:2: sample: expected a JSON object, got list")):
        read_jsonl(str(p), "sample")
