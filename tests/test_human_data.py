"""Human-labelled set adapters (evaluation/human_data.py) and the judge-vs-human metrics (evaluation/human_metrics.py).

The real sets are read from ../shared/data beside the clone (as in CI), or from $KARDIA_HUMAN_DATA where the
checkout sits elsewhere (a git worktree); the metric cases are computed by hand.
"""
import json
import os

import pytest

from kardia_rl.errors import DataError
from kardia_rl.evaluation.human_data import HumanItem, level_range, load_human_items
from kardia_rl.evaluation.human_metrics import agreement_with_humans, kappa_vs_human, pair_mode, pairwise_accuracy

SHARED = os.environ.get("KARDIA_HUMAN_DATA") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                              "shared", "data")
EPITOME, ESCONV = os.path.join(SHARED, "epitome"), os.path.join(SHARED, "esconv")


# ------------------------------------------------------------------------------------------------ real sets
def test_epitome_joins_the_three_mechanisms_into_empathy():
    items = load_human_items(EPITOME, "epitome")
    assert len(items) == 3023  # 3,084 rows; 61 repeat annotations of an (sp_id, rp_id) pair are averaged in
    assert all(it.source == "epitome" and set(it.levels) == {"empathy"} for it in items)
    assert all(0 <= it.levels["empathy"] <= 6 for it in items)
    # the first rows of the three files: sp_id 65m92s, levels 0 (reactions) + 0 (interpretations) + 2 (explorations)
    first = items[0]
    assert first.context_id == "65m92s" and first.context.startswith("Help. Help me.")
    assert first.response.startswith("That's pretty vague")
    assert first.levels["empathy"] == 0 + 0 + 2  # it asks questions: a strong exploration
    assert any(it.levels["empathy"] % 1 == 0.5 for it in items)  # double annotations that disagree are averaged
    assert level_range(items, "empathy") == (0.0, 6.0)
    assert len(load_human_items(EPITOME, "epitome", limit=7)) == 7


def test_esconv_one_item_per_rated_conversation():
    items = load_human_items(ESCONV, "esconv")
    assert len(items) == 1300 - 150
    assert {d for it in items for d in it.levels} == {"empathy", "relevance"}
    one = load_human_items(os.path.join(ESCONV, "train.json"), "esconv", limit=1)[0]
    assert one.context_id == "train:1" and one.levels == {"empathy": 5.0, "relevance": 5.0}
    assert one.context.startswith("I am on short term disability") and "lose my job" in one.context
    assert one.response.startswith("Hi, good afternoon.")  # the supporter's turns, one per line
    assert "Hello good afternoon." not in one.response


# ------------------------------------------------------------------------------------------------ bad input
def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("fmt,lines,expected", [
    ("jsonl", ['{"context": "c", "response": "r", "levels": {"empathy": 3}}', "{oops"], r"x\.jsonl:2: invalid JSON"),
    ("jsonl", ['{"context": "c", "response": "r", "levels": {"kindness": 3}}'],
     r"x\.jsonl:1: levels\.kindness: 'kindness' is not a rubric dimension"),
    ("jsonl", ['{"context": "c", "response": "r", "levels": {"empathy": "high"}}'],
     r"x\.jsonl:1: levels\.empathy: 'high' is not a number"),
    ("jsonl", ['{"context": "c", "levels": {"empathy": 3}}'], r"x\.jsonl:1: response: expected a non-empty string"),
    ("pairs", ['{"context": "c", "chosen": "a", "rejected": "b", "dimension": "warmth"}'],
     r"x\.jsonl:1: dimension: 'warmth' is not a rubric dimension"),
    ("esconv", ['{"dialog": [{"text": "hi", "speaker": "usr"}], "survey_score": {"seeker": {"empathy": "7"}}}'],
     r"x\.jsonl:1: survey_score\.seeker\.empathy: '7' is not a 1-5 rating"),
    ("esconv", ['{"dialog": [{"text": "hi", "speaker": "bot"}], "survey_score": {"seeker": {"empathy": "4"}}}'],
     r"x\.jsonl:1: dialog\[0\]: expected"),
])
def test_bad_lines_name_file_line_and_key(tmp_path, fmt, lines, expected):
    with pytest.raises(DataError, match=expected):
        load_human_items(_write(tmp_path, "x.jsonl", lines), fmt)


def test_bad_epitome_folder(tmp_path):
    with pytest.raises(DataError, match=r"emotional-reactions-reddit\.csv: missing"):
        load_human_items(str(tmp_path), "epitome")
    header = "sp_id,rp_id,seeker_post,response_post,level,rationales\n"
    for name in ("emotional-reactions", "interpretations", "explorations"):
        (tmp_path / f"{name}-reddit.csv").write_text(header + "a,b,post,reply,1,\n", encoding="utf-8")
    assert load_human_items(str(tmp_path), "epitome")[0].levels == {"empathy": 3.0}
    (tmp_path / "interpretations-reddit.csv").write_text(header + "a,b,post,reply,3,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"interpretations-reddit\.csv:2: level: 3 is not 0, 1 or 2"):
        load_human_items(str(tmp_path), "epitome")


def test_user_formats(tmp_path):
    rows = [{"context": "c1", "response": "r1", "levels": {"empathy": 4, "safety": 5}},
            {"context": "c1", "response": "r2", "levels": {"empathy": 2}, "context_id": "c1"}]
    items = load_human_items(_write(tmp_path, "g.jsonl", [json.dumps(r) for r in rows]), "jsonl")
    assert items == [HumanItem("c1", "c1", "r1", {"empathy": 4.0, "safety": 5.0}, "jsonl"),
                     HumanItem("c1", "c1", "r2", {"empathy": 2.0}, "jsonl")]
    pairs = load_human_items(_write(tmp_path, "p.jsonl", [json.dumps({"context": "c", "chosen": "a", "rejected": "b"})]
                                    * 3), "pairs", limit=3)
    assert len(pairs) == 4 and [p.levels for p in pairs[:2]] == [{"empathy": 1.0}, {"empathy": 0.0}]
    assert pairs[0].context_id == pairs[1].context_id != pairs[2].context_id


# ------------------------------------------------------------------------------------------------ metrics
def test_pairwise_accuracy_all_pairs_by_hand():
    # human 0,1,2 ; judge 1,3,2 -> pairs (0<1): judge 1<3 win; (0<2): 1<2 win; (1<2): 3>2 loss -> 2/3
    r = pairwise_accuracy([0, 1, 2], [1, 3, 2], n_boot=0)
    assert r["mode"] == "all" and r["n_pairs"] == 3 and r["accuracy"] == pytest.approx(2 / 3) and r["tie_rate"] == 0
    # a judge tie counts one half; equal human levels are no pair
    r = pairwise_accuracy([0, 0, 1], [2, 1, 2], n_boot=0)
    assert r["n_pairs"] == 2 and r["accuracy"] == pytest.approx((0.5 + 1) / 2) and r["tie_rate"] == pytest.approx(0.5)
    # min gap: only (0, 2) differs by >= 2
    r = pairwise_accuracy([0, 1, 2], [3, 1, 2], min_gap=2, n_boot=0)
    assert r["n_pairs"] == 1 and r["accuracy"] == 0.0
    assert pairwise_accuracy([1, 1], [1, 2], n_boot=0)["accuracy"] is None


def test_pairwise_accuracy_within_contexts_by_hand():
    human, judge = [0, 2, 1, 0, 5], [3, 1, 2, 2, 1]
    ctx = ["a", "a", "b", "b", "c"]
    assert pair_mode(ctx) == "within"
    r = pairwise_accuracy(human, judge, ctx, n_boot=0)
    # a: human 0<2 judge 3>1 loss; b: human 1>0 judge 2=2 tie; c alone. The cross pairs do not count.
    assert r["mode"] == "within" and r["n_pairs"] == 2 and r["accuracy"] == pytest.approx(0.25)
    assert r["tie_rate"] == pytest.approx(0.5)
    assert pairwise_accuracy(human, judge, ctx, mode="all", n_boot=0)["n_pairs"] == 9  # 10 pairs, one equal-level
    assert pair_mode(["a", "b", "c", "c"]) == "within" and pair_mode(["a", "b", "c", "d", "d"]) == "all"


def test_all_pairs_matches_a_brute_force_count():
    import numpy as np

    rng = np.random.default_rng(3)
    h, s = rng.integers(0, 7, 300).astype(float), np.round(rng.normal(size=300), 1)
    wins = ties = n = 0
    for i in range(300):
        for j in range(300):
            if h[i] - h[j] >= 2:
                n += 1
                wins += s[i] > s[j]
                ties += s[i] == s[j]
    r = pairwise_accuracy(h, s, min_gap=2, n_boot=0)
    assert r["n_pairs"] == n and r["accuracy"] == pytest.approx((wins + ties / 2) / n) and r["tie_rate"] == ties / n


def test_kappa_maps_the_judge_onto_the_human_scale():
    # judge 1 -> 0, 3 -> 3, 5 -> 6 on EPITOME's 0-6 scale: identical levels give kappa 1
    assert kappa_vs_human([0, 3, 6], [1, 3, 5], 0, 6) == pytest.approx(1.0)
    # reversed judge: perfect disagreement
    assert kappa_vs_human([0, 6], [5, 1], 0, 6) == pytest.approx(-1.0)
    # by hand on 1-5: human 1,2 ; judge 2,2: observed sum w*O = 1/16, chance sum w*E = (2/16)/2 -> kappa 0
    assert kappa_vs_human([1, 2], [2, 2], 1, 5) == pytest.approx(0.0)


def test_agreement_with_bootstrap_is_reproducible():
    human = [0, 1, 2, 3, 4, 5, 6] * 5
    judge = [1 + 4 * h / 6 + (0.7 if i % 3 == 0 else -0.3) for i, h in enumerate(human)]
    ctx = [str(i) for i in range(len(human))]
    a = agreement_with_humans(human, judge, ctx, (0, 6), min_gaps=(0, 2), n_boot=200)
    b = agreement_with_humans(human, judge, ctx, (0, 6), min_gaps=(0, 2), n_boot=200)
    assert a == b
    lo, hi = a["spearman_ci"]
    assert lo <= a["spearman"] <= hi and 0.8 < a["spearman"] < 1.0
    assert a["pairwise"][1]["accuracy"] == 1.0 and a["pairwise"][0]["accuracy"] < 1.0
    assert a["kappa_ci"][0] <= a["kappa"] <= a["kappa_ci"][1]
    none_scored = agreement_with_humans([1, 2, 3], [None, 2.0, 4.0], ["a", "b", "c"], (1, 5), n_boot=10)
    assert none_scored["n_items"] == 2 and none_scored["unscored"] == 1
