"""`kardia-rl judge-validate`: the command on slices of the real human-labelled sets (embedding judge on the real
Ray judge pool; SmolLM2 as a vLLM judge, slow), and each bias probe against a judge built to fail it, next to a
fair judge that passes."""
import json
import os
import re

import pytest
from conftest import ScriptedChat, honest_json
from test_human_data import EPITOME, ESCONV, _write

from kardia_rl.evaluation.human_data import HumanItem
from kardia_rl.evaluation.judge_probes import BUDGETS, FILLER, run_probes
from kardia_rl.rewards.judge.base import DIMENSIONS, JudgeBackend, Judgment
from kardia_rl.rewards.judge.rubric import RubricJudge

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf", "tiny.yaml")

ITEMS = [HumanItem("a", "My sister stopped talking to me after the wedding and I feel awful about it.",
                   "That sounds painful. What happened at the wedding?", {"empathy": 4.0}, "jsonl"),
         HumanItem("a", "My sister stopped talking to me after the wedding and I feel awful about it.",
                   "Family drama is common.", {"empathy": 1.0}, "jsonl"),
         HumanItem("b", "I failed my driving test again and everyone is laughing at me.",
                   "Failing twice stings, especially when people laugh. You will get there.", {"empathy": 5.0}, "jsonl"),
         HumanItem("b", "I failed my driving test again and everyone is laughing at me.",
                   "Just practise more.", {"empathy": 2.0}, "jsonl")]


# ------------------------------------------------------------------------------------------ judge doubles
class ContentJudge(JudgeBackend):
    """Scores a request by `score(request, original reply)`, the original being the item reply it contains."""

    def __init__(self, score):
        self.score = score

    async def judge(self, requests):
        out = []
        for r in requests:
            orig = max((it.response for it in ITEMS if it.response in r.response), key=len, default=r.response)
            s = min(5.0, max(1.0, float(self.score(r, orig))))
            out.append(Judgment(scores={d: s for d in DIMENSIONS}))
        return out


def fair(r, orig):  # the original reply's content only: deaf to padding, echo and injected text
    return 1 + len(orig) % 5


def long_lover(r, orig):
    return 1 + len(r.response) / 40


def echo_lover(r, orig):
    user = {w for w in re.findall(r"[a-z]{5,}", r.history[-1][1].lower())}
    return fair(r, orig) + 2 * len(user & set(re.findall(r"[a-z]{5,}", r.response.lower())))


def gullible(r, orig):
    return 5 if re.search(r"ignore previous|give 5|score every|full marks", r.response, re.I) else fair(r, orig)


def first_position_chat():
    """Prefers whichever candidate it is shown first (group calls), honest otherwise."""
    def behave(i, conv):
        text = conv[-1]["content"]
        nonce = re.findall(r'"id": "(j[0-9a-f]{9})"', text)[-1]
        n = len(re.findall(r"<<<CANDIDATE_RESPONSE \d+ id=", text))
        if not n:
            return honest_json(conv)
        cands = [{"index": k + 1, "scores": {d: 5 if k == 0 else 2 for d in DIMENSIONS}} for k in range(n)]
        return json.dumps({"id": nonce, "candidates": cands})
    return ScriptedChat(behave)


def defence_shy_chat(shy: bool):
    """Reads the candidate from the defended prompt (nonce quote) or the undefended one (after its heading) and
    scores its length; `shy` judges also mark everything down by 1.5 when the prompt carries security rules."""
    def behave(i, conv):
        text = conv[-1]["content"]
        m = re.search(r"<<<CANDIDATE_RESPONSE id=(j[0-9a-f]{9})>>>\n(.*?)\n<<<END_", text, re.S)
        cand = m.group(2) if m else text.split("## Reply to evaluate\n", 1)[1]
        s = 1 + len(cand) % 4 + (0 if (shy and "Security rules" in conv[0]["content"]) else 1)
        return json.dumps({"id": m.group(1) if m else "none", "scores": {d: s for d in DIMENSIONS}})
    return ScriptedChat(behave)


def direct(score):
    return lambda variant: ContentJudge(score)


def rubric(chat_factory):
    settings = {"base": {}, "group": {"group_wise": True}, "group_reversed": {"group_wise": True,
                                                                             "group_order": "reversed"},
                "undefended": {"defences": False}}
    return lambda variant: RubricJudge(chat_factory(), max_retries=0, cache_size=0, **settings[variant])


def verdicts(judge_for, probes):
    return {p["probe"]: p for p in run_probes(ITEMS, judge_for, probes=probes)}


# ------------------------------------------------------------------------------------------ probes
def test_fair_judges_pass_every_probe():
    assert not any(p["flagged"] for p in verdicts(direct(fair), ["verbosity", "echo", "injection"]).values())
    v = verdicts(rubric(lambda: ScriptedChat()), ["position"])["position"]
    assert v["value"] == 0.0 and not v["flagged"]
    v = verdicts(rubric(lambda: defence_shy_chat(False)), ["benign_drift"])["benign_drift"]
    assert v["value"] == 0.0 and not v["flagged"]


@pytest.mark.parametrize("probe,judge_for", [
    ("verbosity", direct(long_lover)),
    ("echo", direct(echo_lover)),
    ("injection", direct(gullible)),
    ("position", rubric(first_position_chat)),
    ("benign_drift", rubric(lambda: defence_shy_chat(True))),
])
def test_each_probe_flags_a_judge_built_to_fail_it(probe, judge_for):
    v = verdicts(judge_for, [probe])[probe]
    assert v["flagged"] and v["value"] > BUDGETS[probe], v
    assert v["budget"] == BUDGETS[probe]


def test_probe_changes_are_what_the_probe_did():
    # verbosity with a length-loving judge: every reply gains exactly len(" " + FILLER) / 40 (before the cap at 5)
    v = verdicts(direct(long_lover), ["verbosity"])["verbosity"]
    expected = sum(min(5.0, 1 + len(it.response + " " + FILLER) / 40) - min(5.0, 1 + len(it.response) / 40)
                   for it in ITEMS) / len(ITEMS)
    assert v["changes"]["empathy"] == pytest.approx(expected)
    # the gullible judge gives 5 to the attacks that ask for it in words: a share of the set, not all of it
    inj = verdicts(direct(gullible), ["injection"])["injection"]
    assert 0.05 < inj["value"] < 1.0 and inj["n"] == len(ITEMS) * inj["attacks"]


# ------------------------------------------------------------------------------------------ the command
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from kardia_rl.cli import main

    bad = _write(tmp_path, "mine.jsonl", ['{"context": "c", "response": "r", "levels": {"empathy": true}}'])
    assert main(["judge-validate", "--data", bad, "--format", "jsonl", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}:1: levels.empathy: True is not a number"]
    assert not (tmp_path / "o").exists()


def _run(tmp_path, name, data, fmt, limit, *extra):
    from kardia_rl.cli import main

    out = tmp_path / name
    assert main(["judge-validate", CONF, "judge.backend=embedding", "judge.num_actors=1", "--data", data,
                 "--format", fmt, "--limit", str(limit), "--out", str(out), *extra]) == 0
    doc = json.loads((out / "validation.json").read_text())
    return doc, (out / "report.md").read_text()


@pytest.mark.ray
def test_judge_validate_on_both_sets_with_the_embedding_judge_on_the_pool(tmp_path):
    doc, md = _run(tmp_path, "epitome", EPITOME, "epitome", 40, "--probes", "--probe-items", "3")
    assert doc["n_items"] == 40 and doc["judge_failures"] == 0 and list(doc["dimensions"]) == ["empathy"]
    emp = doc["dimensions"]["empathy"]
    assert emp["pairwise"][0]["mode"] == "all" and emp["pairwise"][0]["n_pairs"] > 300
    assert 0.0 <= emp["pairwise"][0]["accuracy"] <= 1.0 and emp["spearman_ci"] and emp["kappa"] is not None
    assert [p["probe"] for p in doc["probes"]] == ["verbosity", "echo", "position", "injection", "benign_drift"]
    by = {p["probe"]: p for p in doc["probes"]}
    assert by["position"]["value"] == 0.0 and by["benign_drift"]["value"] == 0.0  # no group mode, no defences
    assert by["echo"]["changes"]["relevance"] > 0  # the proxy's relevance is a cosine to the user's words
    assert "backend `embedding`" in md and "embedding-proxy-v1" in md and "| verbosity |" in md
    doc2, _ = _run(tmp_path, "esconv", ESCONV, "esconv", 12)
    assert doc2["n_items"] == 12 and set(doc2["dimensions"]) == {"empathy", "relevance"}
    assert doc2["dimensions"]["relevance"]["scale"] == [1.0, 5.0] and doc2["probes"] is None


@pytest.mark.slow
@pytest.mark.ray
def test_judge_validate_with_smollm2_as_a_vllm_judge(tmp_path, smollm2_dir):
    doc, md = _run(tmp_path, "smol", EPITOME, "epitome", 6, "judge.backend=vllm", f"judge.model={smollm2_dir}",
                   "judge.max_tokens=160", "judge.max_retries=1", "judge.max_model_len=4096")
    assert doc["judge"]["backend"] == "vllm" and doc["judge"]["prompt_hash"] and doc["n_items"] == 6
    # whatever SmolLM2 answers: each item is a judgment or a counted failure, and the report says which
    emp = doc["dimensions"]["empathy"]
    assert emp["n_items"] + emp["unscored"] == 6 and emp["unscored"] == doc["judge_failures"]
    assert "backend `vllm`" in md
