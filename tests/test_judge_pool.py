"""The judge pool's rewards do not depend on which actor served a request, for real on CPU: two GRPO steps of
the Ray trainer (vLLM rollout, DeepSpeed learner, the tiny model after a short SFT) with 2 judge actors in
front of an LLM-like loopback judge (tests/judge_server.py, `prompt_scores`: every score is a hash of the
prompt text, nonce included, and of the sampling seed), each step judged twice with the prompt-to-actor
assignment reversed. Before the fix every actor had its own seed (seed + index), so the nonce in the prompt
and the sampling seed, and with them the scores, changed with the actor. Also: the pool's re-sends after an
actor death follow judge.pool_max_attempts."""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import tempfile

import pytest
from conftest import local_ray

from judge_server import ScriptedJudgeServer

# ray: judge actors on a local Ray cluster
pytestmark = pytest.mark.ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRASH_FILE = os.path.join(tempfile.mkdtemp(prefix="kardia-judge-pool-"), "crash")  # exists only when a test wants it


@pytest.fixture(scope="module")
def ray_cluster():
    from kardia_rl.cluster.judge_pool import FAULT_FILE_ENV

    with local_ray({FAULT_FILE_ENV: CRASH_FILE}):
        yield


def _wait_until_restarted(pool, tries: int = 120) -> None:
    import time

    import ray
    from ray.exceptions import RayActorError

    for _ in range(tries):
        try:
            ray.get([a.pid.remote() for a in pool.actors])
            return
        except RayActorError:  # ActorUnavailableError while Ray restarts it
            time.sleep(0.5)
    raise AssertionError("a judge actor did not come back after its restart")


def test_pool_attempts_follow_the_config_key(ray_cluster, tmp_path):
    """judge.pool_max_attempts = sends of a batch whose judge actor dies. With 1 the death is at once a counted
    failed judgment (the pool used to re-send 3 times whatever the config); with 2 the batch is re-sent to the
    other actor and judged."""
    from kardia_rl.config import load_config
    from kardia_rl.rewards.judge.base import JudgeRequest
    from kardia_rl.cluster.judge_pool import JudgePool

    req = JudgeRequest("Mia, 34, nurse", "She lost her job.", (("user", "I feel useless."),), "That sounds heavy.", "g")
    with ScriptedJudgeServer() as server:
        cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [
            f"run_dir={tmp_path}", "judge.num_actors=2", "judge.backend=openai", f"judge.api_base={server.url}",
            "judge.model=judge-test", "judge.backoff_s=0.01", "judge.cache_size=0", "judge.pool_max_attempts=1"])
        pool = JudgePool(cfg)
        try:
            open(CRASH_FILE, "w").close()  # the next request kills the actor serving it (once)
            [j] = asyncio.run(pool.judge([req]))
            assert not j.ok and j.fallback and "died" in j.error and pool.actor_failures == 1
            _wait_until_restarted(pool)  # else the re-send could meet the restarting actor, not a dying one
            pool.policy = dataclasses.replace(pool.policy, pool_max_attempts=2)
            open(CRASH_FILE, "w").close()
            [k] = asyncio.run(pool.judge([req]))
            assert k.ok and pool.actor_failures == 2
        finally:
            pool.shutdown()


def _cfg(run_dir, model, url):
    from kardia_rl.config import load_config

    return load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [
        f"run_dir={run_dir}", f"model.path={model}", "data.max_history_turns=1", "model.max_new_tokens=64",
        "algo.group_size=4", "algo.prompts_per_step=4", "algo.num_steps=2", "learner.micro_batch_size=8",
        "learner.lr=5e-4", "learner.zero_stage=0", "algo.kl_beta=0", "rollout.num_actors=1",
        "judge.num_actors=2", "judge.backend=openai", f"judge.api_base={url}", "judge.model=judge-test",
        "judge.judge_malformed=true", "judge.backoff_s=0.01", "judge.cache_size=0", "checkpoint.every=0",
        "logging.wandb_mode=disabled"])


def _samples(n=12):
    from kardia_rl.data import expand_turns, load_dialogues

    return [t for d in load_dialogues("builtin:sample/train")[:6] for t in expand_turns(d)][:n]


def test_rewards_do_not_depend_on_which_judge_actor_served_them(ray_cluster, sft_model_dir, tmp_path):
    """Each of two GRPO steps is judged twice through the pool: prompt j's candidates go to actor j % 2, then
    to actor 1 - j % 2 (no judge cache, so the second pass is judged afresh). The step trains on the first."""
    import ray

    from kardia_rl.trainer.driver import GRPOTrainer

    reverse: contextvars.ContextVar[bool] = contextvars.ContextVar("reverse", default=False)
    served, passes = set(), []
    with ScriptedJudgeServer(prompt_scores=True) as server:
        cfg = _cfg(tmp_path, sft_model_dir, server.url)
        tr = GRPOTrainer(cfg, _samples(), cfg.model.path).setup()
        pool, reward = tr.judge, tr.reward
        pool_judge, score = pool.judge, reward.score

        async def routed(requests):
            by_actor: dict = {}
            for k, r in enumerate(requests):  # group ids are "step:prompt"
                parity = int(r.group_id.split(":")[1]) % 2
                by_actor.setdefault(1 - parity if reverse.get() else parity, []).append(k)
                served.add((parity, 1 - parity if reverse.get() else parity))
            out = [None] * len(requests)
            for actor, ks in sorted(by_actor.items()):
                pool._pick = lambda exclude, a=actor: a  # read by JudgePool.judge before its first await
                for k, j in zip(ks, await pool_judge([requests[k] for k in ks])):
                    out[k] = j
            return out

        async def score_both_ways(samples, texts, groups):
            first = await score(samples, texts, groups)
            reverse.set(True)  # this task's context only
            second = await score(samples, texts, groups)
            reverse.set(False)
            passes.append(([(b.total, b.dims) for b in first], [(b.total, b.dims) for b in second],
                           sum(b.judged for b in first)))
            return first

        pool.judge, reward.score = routed, score_both_ways
        try:
            for step in (1, 2):
                m = tr.step(step)
                assert m["train/step_applied"] == 1.0
            per_actor = [st["judge/requests"] for st in ray.get([a.stats.remote() for a in pool.actors])]
        finally:
            tr.shutdown()
    assert served == {(0, 0), (1, 1), (0, 1), (1, 0)} and min(per_actor) > 0
    assert len(passes) >= 2 and sum(p[2] for p in passes) >= 16, "the candidates go to the LLM judge"
    dims = {tuple(d.values()) for p in passes for _, d in p[0]}
    assert len(dims) > 1, "the loopback judge's scores vary with the prompt"
    for first, second, _ in passes:
        assert first == second
