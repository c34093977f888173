"""SFT on the learner group (Ray ranks, gloo): world size 2 follows world size 1's loss curve; the validation
sample is capped (sft.max_val_samples=1: one validation turn for 2 ranks, so rank 1 scores only padding yet makes
the same collective calls); the W=2 run's format check generates on a real vLLM rollout actor that loads the
exported folder (written by rank 0 alone; its memory: bench/bench_export_memory.py).

Both runs see the same step plan (every batch has >= 2 rows, so none is dropped for W=2); each step's loss is the
GLOBAL token mean (deepspeed_learner normalises by all-reduced counts), so the curves differ only by float
summation order in the gradient all-reduce. Tolerance: 1e-4 absolute on a loss near 8 (fp32; measured
differences are ~1e-6). Runtime about 40-60 s on 2 busy cores.
"""
from __future__ import annotations

import json
import os

import pytest
from conftest import local_ray

# ray: SFT on the Ray learner group (DeepSpeed on gloo)
pytestmark = pytest.mark.ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


@pytest.fixture(scope="module")
def ray_local():
    with local_ray():
        yield


def _cfg(run_dir, model, workers, stage):
    from kardia_rl.config import load_config

    return load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [
        f"run_dir={run_dir}", f"model.path={model}", "data.max_history_turns=1", "sft.max_seq_len=384",
        "sft.batch_size=4", "sft.micro_batch_size=1", "sft.max_steps=4", "sft.eval_every=2", "sft.lr=2e-3",
        "sft.warmup_steps=1", f"learner.num_workers={workers}", f"learner.zero_stage={stage}",
        "sft.max_val_samples=1", "rollout.num_actors=1", "rollout.kv_cache_bytes=67108864",
        "model.max_new_tokens=24", "logging.wandb_mode=disabled"])


def _losses(out_dir):
    with open(os.path.join(out_dir, "sft_metrics.jsonl")) as f:
        return [json.loads(line)["train/sft_loss"] for line in f]


@pytest.mark.parametrize("stage", [3])
def test_sft_world_size_2_matches_world_size_1(ray_local, tiny_model_dir, tmp_path, stage):
    from kardia_rl.data.encoding import load_training_turns
    from kardia_rl.cluster.learner_group import run_sft_on_group

    cfg1 = _cfg(tmp_path / "w1", tiny_model_dir, 1, stage)
    train, val = load_training_turns(cfg1)
    train, val = train[:16], val[:6]
    res = {}
    for w in (1, 2):
        out = str(tmp_path / f"w{w}" / "sft_model")
        res[w] = run_sft_on_group(_cfg(tmp_path / f"w{w}", tiny_model_dir, w, stage), out, train, val,
                                  generate_eval=w == 2, progress=False)
        assert res[w]["world_size"] == w  # really w ranks (the old pipeline ran SFT in one process)
        assert (res[w]["val_examples"], res[w]["val_turns_total"]) == (1, 6)  # capped: fewer turns than ranks
        assert os.path.exists(os.path.join(out, "model.safetensors"))
    # the format check: greedy answers from the rollout actor on the exported model, counted by score_answers
    after = res[2]["after"]
    assert after["n"] == 1 and after["actors"] == 1 and len(after["examples"]) == 1
    from kardia_rl.learner.sft import score_answers, val_sample

    capped = val_sample(val, _cfg(tmp_path, tiny_model_dir, 2, stage))
    assert after["examples"][0]["id"] == capped[0].id
    recount = score_answers(capped, [after["examples"][0]["output"]], _cfg(tmp_path, tiny_model_dir, 2, stage))
    assert (res[2]["format_valid_rate"], res[2]["emotion_accuracy"]) == (recount["format_valid_rate"],
                                                                         recount["emotion_accuracy"])
    with open(tmp_path / "w2" / "sft_model" / "sft_result.json") as f:
        saved = json.load(f)
    assert saved["format_valid_rate"] == res[2]["format_valid_rate"] and saved["after"]["n"] == 1
    # a run stopped between training and the check (w1 never ran it) gets the check on resume; a checked one not again
    from kardia_rl.cluster.sft_check import finish_format_check

    assert "after" not in res[1]
    resumed = finish_format_check(_cfg(tmp_path / "w1", tiny_model_dir, 1, stage), str(tmp_path / "w1" / "sft_model"),
                                  val)
    assert resumed["after"]["n"] == 1 and "format_valid_rate" in resumed
    with open(tmp_path / "w1" / "sft_model" / "sft_result.json") as f:
        assert json.load(f)["after"] == resumed["after"]
    assert finish_format_check(_cfg(tmp_path / "w2", tiny_model_dir, 2, stage), str(tmp_path / "w2" / "sft_model"),
                               val)["after"] == saved["after"]
    l1, l2 = _losses(tmp_path / "w1" / "sft_model"), _losses(tmp_path / "w2" / "sft_model")
    assert len(l1) == len(l2) == 4
    assert l1[-1] < l1[0]  # it trains
    assert max(abs(a - b) for a, b in zip(l1, l2)) < TOL, (l1, l2)
    v1, v2 = res[1]["val_loss_history"], res[2]["val_loss_history"]
    assert [s for s, _ in v1] == [s for s, _ in v2] == [2, 4]
    assert max(abs(a[1] - b[1]) for a, b in zip(v1, v2)) < TOL, (v1, v2)
