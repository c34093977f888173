"""`ray job submit` against a real head node on 127.0.0.1: the job trains for a step and writes its metrics."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from ray_head import RAY, start_head, stop_head

# ray: a throwaway Ray head and a submitted job
pytestmark = pytest.mark.ray


@pytest.fixture
def head_node(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    head = start_head(dashboard=True)  # the job API needs the dashboard
    try:
        yield head
    finally:
        stop_head(head["temp"])


def test_ray_job_submit_trains_and_writes_metrics(head_node, sft_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", f"model.path={sft_model_dir}", "algo.num_steps=1", "algo.group_size=4",
                 "algo.prompts_per_step=2", "learner.micro_batch_size=8", "model.max_new_tokens=32",
                 "rollout.num_actors=1", "judge.num_actors=1", "logging.wandb_mode=disabled",
                 "data.max_history_turns=1", "checkpoint.every=0"]
    env = dict(head_node["env"], RAY_ADDRESS=head_node["dashboard"], RAY_BIN=RAY, KARDIA_CMD="train",
               KARDIA_SUBMIT_ARGS="--no-wait")
    for _ in range(40):  # right after `ray start` the job agent may not be up yet: Ray says so, we retry
        out = subprocess.run(["bash", os.path.join(ROOT, "launch", "submit.sh"), "conf/tiny.yaml", *overrides],
                             env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in out.stderr + out.stdout:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout + out.stderr
    found = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr)
    assert found, out.stdout + out.stderr
    job_id = found.group(0)
    status = ""
    deadline = time.time() + 900  # a bound on waiting, not a speed assertion
    while time.time() < deadline:
        st = subprocess.run([RAY, "job", "status", "--address", head_node["dashboard"], job_id], env=env,
                            capture_output=True, text=True, timeout=120)
        status = st.stdout + st.stderr
        if any(s in status.upper() for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = subprocess.run([RAY, "job", "logs", "--address", head_node["dashboard"], job_id], env=env,
                          capture_output=True, text=True, timeout=120).stdout
    assert "SUCCEEDED" in status.upper(), f"job did not succeed: {status}\n--- logs:\n{logs[-4000:]}"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1] and rows[0]["rollout/sync_logprob_diff"] < 1e-3
    assert os.path.isfile(run_dir / "policy" / "config.json")
