"""Helpers of tests/test_faults.py: short GRPO runs of the tiny model (in this process or as `kardia-rl train`),
the faults they suffer (a kill hook's file, a judge that holds a request while its actor is killed, kill -9 of a
whole job) and the comparison with an undisturbed run."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time

import pytest
from judge_server import ScriptedJudgeServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KARDIA = os.path.join(os.path.dirname(sys.executable), "kardia-rl")


def overrides(run_dir, model, *extra):
    return [f"run_dir={run_dir}", f"model.path={model}", "data.max_history_turns=1", "model.max_new_tokens=96",
            "algo.group_size=4", "algo.prompts_per_step=2", "algo.num_steps=4", "learner.micro_batch_size=8",
            "learner.lr=5e-4", "learner.zero_stage=2", "rollout.num_actors=1", "judge.num_actors=1",
            "checkpoint.every=0", "logging.wandb_mode=disabled", "algo.kl_beta=0.01", "learner.cpu_threads=1", *extra]


def steps(run_dir) -> list[int]:
    from kardia_rl.monitoring.logger import read_metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    return [r["step"] for r in read_metrics(path)] if os.path.exists(path) else []


def wait_for_step(run_dir, step: int, proc=None, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if steps(run_dir) and steps(run_dir)[-1] >= step:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.5)
    raise AssertionError(f"step {step} not logged within {timeout} s")


def kill_learner_after(run_dir, step: int) -> threading.Thread:
    """Kill -9 the learner rank's worker process (a descendant of this test process, titled ray::LearnerActor)
    once `step` is logged."""
    import psutil

    def work():
        wait_for_step(run_dir, step)
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


class DyingGroup:
    """RolloutGroup's dispatch contract without Ray: each candidate depends only on (prompt, seed, k); the generate
    calls numbered in `die_on` (1-based, over the whole step) fail as if the actor's process had been killed."""

    def __init__(self, n_actors: int, die_on=()):
        self.actors, self.outstanding, self.die_on, self.calls = list(range(n_actors)), [0] * n_actors, set(die_on), 0

    def submit(self, prompts, n, *, seed):
        from ray.exceptions import ActorDiedError

        from kardia_rl.engines.base import Completion

        i = next(k for k in range(len(self.actors)) if self.outstanding[k] == 0)
        self.outstanding[i] += 1
        self.calls += 1
        dies = self.calls in self.die_on

        async def result():
            await asyncio.sleep(0)
            if dies:
                raise ActorDiedError()
            return [[Completion([p[0], k], f"{p[0]}:{seed % 997}:{k}", [-1.0, -1.0], "stop") for k in range(n)]
                    for p in prompts]
        return i, result()

    def done(self, i):
        self.outstanding[i] -= 1


class LengthReward:
    async def score(self, samples, texts, groups):
        from kardia_rl.rewards.unified import RewardBreakdown

        return [RewardBreakdown(total=len(t) / 10, format=1.0, emotion=0.0, rubric=0.0) for t in texts]


def DETERMINISTIC(key: str) -> bool:
    from kardia_rl.trainer.driver import NON_DETERMINISTIC_PREFIXES  # wall-clock keys, the driver's one list

    return not key.startswith(NON_DETERMINISTIC_PREFIXES)


def fault_overrides(run_dir, model, *extra):
    """Two rollout actors (a replaced engine must rejoin a group with a survivor), three steps, a checkpoint at each;
    a short sync timeout bounds what a death inside a collective can cost."""
    return overrides(run_dir, model, "rollout.num_actors=2", "algo.num_steps=3", "checkpoint.every=1",
                     "checkpoint.keep_last=3", "rollout.kv_cache_bytes=134217728", "rollout.sync_timeout_s=30", *extra)


def train_in_process(run_dir, model, *extra, env=None):
    import ray

    from kardia_rl.config import load_config
    from kardia_rl.cluster.ray_cluster import init_ray
    from kardia_rl.trainer.run import run_train

    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), fault_overrides(run_dir, model, *extra))
    os.environ.update(env or {})  # before Ray starts: the actors inherit it
    try:
        init_ray(num_cpus=2)
        return run_train(cfg)
    finally:
        ray.shutdown()
        for k in env or {}:
            os.environ.pop(k, None)


def metrics_by_step(run_dir) -> dict[int, dict]:
    from kardia_rl.monitoring.logger import read_metrics

    return {r["step"]: r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))}


def assert_same_metrics(got: dict, want: dict, steps) -> None:
    for s in steps:
        keys = [k for k, v in want[s].items() if DETERMINISTIC(k) and isinstance(v, float)
                and k not in ("rollout/actor_restarts", "judge/actor_failures")]
        assert keys and {k: got[s].get(k) for k in keys} == pytest.approx({k: want[s][k] for k in keys},
                                                                          rel=1e-5, abs=1e-6), f"step {s}"


class HoldingJudgeServer(ScriptedJudgeServer):
    """A scripted judge that, once armed, holds the next request until released: the test kills the judge actor
    while that request is in flight (a kill between requests would go unnoticed, and uncounted)."""

    def __init__(self):
        super().__init__()
        self.armed, self.held, self.release = threading.Event(), threading.Event(), threading.Event()

    async def _reply(self, step, request, body):
        if self.armed.is_set() and not self.held.is_set():
            self.held.set()
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        return await super()._reply(step, request, body)


def kill_judge_mid_request(run_dir, server, after_step: int = 0) -> threading.Thread:
    """SIGKILL the judge actor while it waits on the held request: the first one after `after_step` is logged
    (0: the run's first request; arming after a logged step races a fast next step, whose requests may all
    be answered before the arm)."""
    import psutil

    def work():
        try:
            if after_step:
                wait_for_step(run_dir, after_step)
            server.armed.set()
            assert server.held.wait(timeout=600), "no judge request after the arm"
            judges = [p for p in psutil.Process(os.getpid()).children(recursive=True)
                      if "JudgeActor" in " ".join(p.cmdline())]
            assert len(judges) == 1, f"expected the one judge actor, found {len(judges)}"
            judges[0].send_signal(signal.SIGKILL)
            judges[0].wait(timeout=60)
        finally:
            server.release.set()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def kardia_train(run_dir, model, *extra, **popen):
    cmd = [KARDIA, "train", os.path.join(ROOT, "conf", "tiny.yaml"), *fault_overrides(run_dir, model, *extra)]
    return cmd, {"cwd": ROOT, "env": {**os.environ, "OMP_NUM_THREADS": "1"}, "text": True, **popen}


def kill_job(proc) -> None:
    """kill -9 the train process and everything it started (its Ray head, raylet, workers and engines)."""
    import psutil

    started = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(timeout=60)  # reaped here, so its return code is the signal's
    for p in started:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(started, timeout=30)
