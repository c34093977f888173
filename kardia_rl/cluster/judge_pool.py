"""The judge pool: J Ray actors serving the rubric judge, behind the ordinary `JudgeBackend` contract.

`JudgePool` is what the driver's `UnifiedReward` calls: each batch of judge requests goes to the actor with
the fewest requests in flight (cluster/balance.py), so candidates are scored as soon as they are generated
and judging overlaps generation. Actors are async (many requests in flight each, bounded by the judge's own
`max_in_flight`). Ray restarts a dead actor (max_restarts=-1); the batch that was in flight is re-sent to
another actor after the policy's backoff, counted in `actor_failures`, and after `judge.pool_max_attempts`
sends in all its requests become failed Judgments, which the reward layer turns into counted fallbacks.
Timeouts and retries of single requests are the judge's inside each actor (rewards/judge/base.py), so they
never multiply with these attempts. Nothing here raises into training.
All actors judge with the same seed, so which actor serves a request (load, restarts) never changes its
reward (tests/test_judge_pool.py judges two GRPO steps twice, with the request-to-actor assignment reversed).
"""
from __future__ import annotations

import asyncio
import os
import random
from typing import Sequence

import ray
from ray.exceptions import RayActorError

from kardia_rl.config import from_dict, to_dict
from kardia_rl.rewards.judge.base import (
    ChatRequestError, JudgeBackend, JudgeRequest, Judgment, RetryPolicy, failed_judgment, retry_delay,
)
from kardia_rl.cluster.balance import least_loaded
from kardia_rl.utils.construction_log import record


@ray.remote(max_restarts=-1, max_task_retries=0)
class JudgeActor:
    def __init__(self, cfg_dict: dict, index: int):
        from kardia_rl.rewards.judge import make_judge

        cfg = from_dict(cfg_dict)
        self.index = index
        self.model = cfg.judge.model if cfg.judge.backend != "embedding" else "embedding"
        # Every actor gets the same judge seed: a request's nonce and sampling seed are derived from (seed,
        # request) alone (RubricJudge.request_seed), so its reward does not depend on which actor served it.
        self.backend = make_judge(cfg.judge, seed=cfg.seed)

    def pid(self) -> int:
        return os.getpid()

    async def judge(self, requests: list[JudgeRequest]) -> list[Judgment]:
        _maybe_inject_crash()
        record("call", "judge", self.model, requests=len(requests))
        return await self.backend.judge(requests)

    async def complete(self, conversations: list, temperature: float, max_tokens: int, seed) -> list:
        """Raw chat on this actor's judge model, without the rubric (synthesis' evaluator R writes its own
        prompt): one attempt per conversation, results or the exceptions they failed with, in order."""
        _maybe_inject_crash()
        record("call", "complete", self.model, requests=len(conversations))
        chat = getattr(self.backend, "chat", None)
        if chat is None:  # the embedding judge has no chat model; the synth config check also says so
            return [ChatRequestError(f"judge actor {self.index}: judge.backend {self.backend.name!r} is not a chat "
                                     "model", kind="internal", retryable=False) for _ in conversations]
        return await chat.complete(conversations, temperature=temperature, max_tokens=max_tokens, seed=seed)

    async def stats(self) -> dict:
        st = getattr(self.backend, "stats", None)
        out = st.as_dict() if hasattr(st, "as_dict") else {}
        chat = getattr(getattr(self.backend, "chat", None), "stats", None)  # the transport's own counters (openai)
        if isinstance(chat, dict):
            out.update({f"chat/{k}": v for k, v in chat.items() if isinstance(v, (int, float))})
        cache = getattr(self.backend, "cache", None)
        if cache is not None and hasattr(cache, "hit_rate"):
            out.update(cache_hits=cache.hits, cache_misses=cache.misses)
        return out


# Per-step judge counters in metrics.jsonl -> the actor-side counters they sum. Retries and timeouts are
# RubricJudge's alone (the transport makes one attempt per call); HTTP details are the transport's.
COUNTERS = {
    "judge/retries": ("judge/retries",),
    "judge/timeouts": ("judge/timeouts",),
    "judge/parse_failures": ("judge/parse_failures",),
    "judge/http_errors": ("chat/http_errors",),
    "judge/connection_errors": ("chat/connection_errors",),
    "judge/rate_limit_wait_s": ("chat/rate_wait_s",),
}

FAULT_FILE_ENV = "KARDIA_FAULT_JUDGE_CRASH_FILE"


def _maybe_inject_crash() -> None:
    """Fault injection for the fault-tolerance test: if the file named by $KARDIA_FAULT_JUDGE_CRASH_FILE exists,
    the first request to see it deletes it and kills this actor's process mid-request (consumed once, so the
    restarted actor runs normally). Unset in normal runs: costs one environment lookup."""
    path = os.environ.get(FAULT_FILE_ENV)
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            return
        os._exit(1)


class JudgePool(JudgeBackend):
    name = "pool"

    def __init__(self, cfg, cpus_per_actor: float = 0.0):
        d = to_dict(cfg)
        opts = {"num_cpus": cpus_per_actor, "num_gpus": cfg.judge.gpus_per_actor}
        self.actors = [JudgeActor.options(**opts).remote(d, i) for i in range(cfg.judge.num_actors)]
        self.in_flight = [0] * len(self.actors)
        self.policy = RetryPolicy.from_config(cfg.judge)
        self.actor_failures = 0
        self._jitter = random.Random()  # spreads re-sends in time only
        ray.get([a.pid.remote() for a in self.actors])

    def _pick(self, exclude: set[int]) -> int:
        return least_loaded(self.in_flight, exclude)

    async def _send(self, call) -> tuple[list | None, str]:
        """`call(actor)` on the least-loaded actor; when that actor dies mid-call, again on another one after the
        policy's backoff, at most judge.pool_max_attempts sends. (result, "") or (None, why it failed)."""
        tried: set[int] = set()
        last_error = ""
        for attempt in range(self.policy.pool_max_attempts):
            if attempt:  # give Ray time to restart the dead actor, in case every actor has been tried
                await asyncio.sleep(retry_delay(self.policy.backoff_s, attempt, self._jitter))
            i = self._pick(tried)
            self.in_flight[i] += 1
            try:
                return await call(self.actors[i]), ""
            except RayActorError as e:  # the actor died mid-request: Ray restarts it; re-send elsewhere
                self.actor_failures += 1
                tried.add(i)
                last_error = f"judge actor {i} died: {type(e).__name__}"
            finally:
                self.in_flight[i] -= 1
        return None, f"{last_error} ({self.policy.pool_max_attempts} attempt(s))"

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgment]:
        out, why = await self._send(lambda actor: actor.judge.remote(list(requests)))
        if out is None:
            return [failed_judgment(why, attempts=self.policy.pool_max_attempts) for _ in requests]
        return out

    async def complete(self, conversations: Sequence[list[dict]], *, temperature: float, max_tokens: int,
                       seed=None) -> list:
        """The ChatBackend contract on the pool (synthesis' evaluator R): the same balancing and re-sends as
        judge(); the caller's retry policy sees an exhausted pool as one non-retryable failure per conversation."""
        out, why = await self._send(lambda actor: actor.complete.remote(list(conversations), temperature,
                                                                         max_tokens, seed))
        if out is None:
            return [ChatRequestError(why, kind="connection", retryable=False) for _ in conversations]
        return out

    def stats(self) -> dict:
        """Summed counters of every actor (calls, failures, cache hits ...) plus actor deaths seen here."""
        total: dict = {"actor_failures": self.actor_failures}
        for st in ray.get([a.stats.remote() for a in self.actors]):
            for k, v in st.items():
                if isinstance(v, (int, float)) and not k.startswith("latency"):
                    total[k] = total.get(k, 0) + v
        return total

    def step_counters(self) -> dict:
        """What went wrong in the judge actors since the last call, as per-step metrics: retries and timeouts of
        both layers (RubricJudge re-asks, the transport's own retries), unparseable judgments, HTTP errors (429
        included), connection errors, seconds spent waiting on the rate limiter. A restarted actor starts from zero
        again, so a counter that went down counts from zero."""
        now = ray.get([a.stats.remote() for a in self.actors])
        prev = getattr(self, "_prev_counters", [{}] * len(now))
        self._prev_counters = now
        out = {name: 0.0 for name in COUNTERS}
        for cur, old in zip(now, prev):
            for name, keys in COUNTERS.items():
                for k in keys:
                    c, o = float(cur.get(k, 0)), float(old.get(k, 0))
                    out[name] += c - o if c >= o else c
        return out

    def kill_actor(self, index: int) -> None:
        """Fault injection for tests: kill one actor's process (Ray restarts it)."""
        ray.kill(self.actors[index], no_restart=False)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)

    async def close(self) -> None:  # the JudgeBackend/ChatBackend ending (synthesis' ChatClient closes with it)
        self.shutdown()
