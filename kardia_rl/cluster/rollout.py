"""One rollout: generate N candidates per prompt on the rollout group and score each chunk the moment it
is generated (judging overlaps generation), all inside one asyncio loop.

Batching: one chunk per rollout actor, so each engine gets its whole share of the step in ONE generate call
(vLLM batches across all of it). Two chunks per actor would queue the second call on the synchronous actor
and run two half batches back to back (bench/bench_generation.py --split-calls measures the cost).

Determinism: prompts are cut into contiguous chunks whose layout depends only on the number of prompts and
of actors (config, never timing), and chunk c of step s is sampled with seed hash(seed, s, c), so results
do not depend on which actor served a chunk or in which order chunks finished; a resumed run regenerates
exactly the same candidates.

Faults: a rollout actor that dies during its generate call (a killed process, a lost node) is replaced by
`recover(actor index, error)` (the driver's: a new actor in its place with the current weights, verified) and
its chunk is sent again; the chunk is seeded, so the step's results equal an undisturbed step's. At most
`max_restarts` per step (rollout.max_restarts_per_step), then one error naming the actor.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol, Sequence

from ray.exceptions import RayActorError

from kardia_rl.engines.base import Completion
from kardia_rl.cluster.preemption import ActorLost
from kardia_rl.rewards.unified import RewardBreakdown
from kardia_rl.utils.seeds import derive_seed, split_even


class ChunkGenerator(Protocol):
    """What generate_and_score needs of the rollout group (cluster/rollout_group.RolloutGroup; tests' fakes)."""
    actors: Sequence[Any]  # one chunk per actor

    def submit(self, prompts: list[list[int]], n: int, *, seed: int, **sampling: Any) -> tuple[int, Awaitable]:
        """Send a chunk to an idle actor: (its index, an awaitable of n Completions per prompt)."""

    def done(self, index: int) -> None:
        """The chunk sent to actor `index` has returned (or failed): the actor is idle again."""


class ChunkScorer(Protocol):
    """What generate_and_score needs of the reward (rewards/unified.UnifiedReward; tests' fakes)."""

    async def score(self, samples: Sequence[Any], completions: Sequence[str],
                    group_ids: Optional[Sequence[Any]] = None) -> list[RewardBreakdown]:
        """One breakdown per completion; `group_ids` groups a prompt's N candidates (group-wise judging)."""


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    return derive_seed(seed, step, chunk, scheme="colon56")


def contiguous_chunks(n_items: int, n_chunks: int) -> list[list[int]]:
    n_chunks = max(1, min(n_items, n_chunks))
    return [list(range(lo, hi)) for lo, hi in split_even(n_items, n_chunks)]


@dataclass
class Rollout:
    """A scored rollout batch, prompt-major: candidate k of prompt i is at index i * N + k."""
    samples: list  # one per prompt
    prompt_ids: list[list[int]]  # one per prompt
    completions: list[Completion]  # one per candidate
    rewards: list[RewardBreakdown]  # one per candidate
    timing: dict = field(default_factory=dict)
    actor_restarts: int = 0  # rollout actors that died during this step's generation and were replaced
    policy_versions: list = field(default_factory=list)  # per candidate: the update its weights held (0 = initial)
    reward_stats: dict = field(default_factory=dict)  # the reward's counters over this rollout's scoring

    @property
    def group_size(self) -> int:
        return len(self.completions) // len(self.samples)


def generate_and_score(rollout_group: ChunkGenerator, reward: ChunkScorer, samples: Sequence[Any],
                       prompt_ids: Sequence[list[int]], *, n: int, seed: int, step: int,
                       recover: Optional[Callable[[int, BaseException], None]] = None, max_restarts: int = 0,
                       sampling: Optional[dict] = None, on_generated: Optional[Callable[[], None]] = None) -> Rollout:
    """`sampling`: decoding overrides for RolloutGroup.submit (greedy, temperature; validation uses eval's).
    `on_generated()` is called once the last chunk is generated (its judging may go on): the one-step-off driver
    waits for that, not for the judging, before it syncs new weights (trainer/one_step_off.py)."""
    chunks = contiguous_chunks(len(samples), len(rollout_group.actors))
    comps: list = [None] * len(samples)
    rewards: list = [None] * len(samples)
    marks: dict[str, float] = {}
    restarts: list[int] = []
    left = [len(chunks)]  # chunks still generating

    async def generate(c: int, idx: list[int]):
        while True:
            actor, ref = rollout_group.submit([prompt_ids[j] for j in idx], n, seed=chunk_seed(seed, step, c),
                                              **(sampling or {}))
            try:
                return await ref
            except RayActorError as e:
                if recover is None or max_restarts <= 0:
                    raise  # no in-place restart: the step fails like any actor failure (checkpoint.auto_resume)
                restarts.append(actor)
                if len(restarts) > max_restarts:
                    raise ActorLost(
                        f"rollout actor {actor} died at step {step} ({type(e).__name__}) after {max_restarts} "
                        f"rollout actor restart(s) in this step (rollout.max_restarts_per_step={max_restarts}); "
                        f"its engine keeps failing: look at that actor's log above, then resume with "
                        f"checkpoint.resume=true") from None
                # In a thread: the replacement waits for the other actors' chunks, whose scoring goes on here.
                await asyncio.to_thread(recover, actor, e)
            finally:
                rollout_group.done(actor)

    async def one_chunk(c: int, idx: list[int]) -> None:
        out = await generate(c, idx)
        marks["generated"] = time.perf_counter()
        left[0] -= 1
        if left[0] == 0 and on_generated is not None:
            on_generated()
        flat_samples = [samples[j] for j in idx for _ in range(n)]
        texts = [c.text for per in out for c in per]
        groups = [f"{step}:{j}" for j in idx for _ in range(n)]
        scored = await reward.score(flat_samples, texts, groups)
        for pos, j in enumerate(idx):
            comps[j], rewards[j] = out[pos], scored[pos * n:(pos + 1) * n]

    async def run() -> None:
        await asyncio.gather(*(one_chunk(c, idx) for c, idx in enumerate(chunks)))

    t0 = time.perf_counter()
    asyncio.run(run())
    t1 = time.perf_counter()
    # generation: until the last chunk was generated; judge: the scoring tail that did not overlap it.
    timing = {"timing/generation": marks["generated"] - t0, "timing/judge": t1 - marks["generated"]}
    return Rollout(list(samples), [list(p) for p in prompt_ids], [c for per in comps for c in per],
                   [r for per in rewards for r in per], timing, actor_restarts=len(restarts))
