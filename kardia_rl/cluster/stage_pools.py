"""The pools of a stage that generates and judges outside GRPO (the split's rating, eval): the placement rule.

Every answer is generated on a rollout group (rollout.num_actors Ray actors holding rollout.gpus_per_actor
each) and every judgment is made on a judge pool (judge.num_actors actors holding judge.gpus_per_actor), so
no engine or judge model lives in the job's driver or a stage's process (utils/construction_log.py audits
it). `StagePools` holds ONE judge pool for the whole stage (started at its first use) and one rollout group
at a time, for the model being answered with: asking for another model shuts the group down first (its GPUs
go to the next one), asking for the same model again reuses it. `close()` releases both before the stage
ends, so the next stage finds its GPUs free.

`generate_scored` answers a list of samples in blocks of BLOCK_PER_ACTOR prompts per rollout actor: each block
is one `cluster.rollout.generate_and_score` call (one chunk per actor, judging overlapping generation), so
memory stays bounded by a block and progress is printed per block. Block b's chunk c is sampled with
chunk_seed(seed, b, c): the same config and seed give the same answers, whichever actor served a chunk.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from kardia_rl.cluster.rollout import Rollout, generate_and_score

BLOCK_PER_ACTOR = 64  # prompts per rollout actor per generate call: large enough for vLLM to batch, bounded memory


class StagePools:
    def __init__(self, cfg, stage: str):
        from kardia_rl.cluster.ray_cluster import init_ray

        self.cfg, self.stage = cfg, stage
        init_ray(cfg.ray.address, cfg.ray.num_cpus, log_level=cfg.logging.engine_log_level)
        self._judge = None
        self._group = None
        self.model_path: Optional[str] = None
        self.groups_started = 0  # rollout groups this stage started (a reused one counts once)

    @property
    def judge(self):
        """The stage's judge pool (JudgeBackend and ChatBackend), started at its first use."""
        if self._judge is None:
            from kardia_rl.cluster.judge_pool import JudgePool

            t0 = time.perf_counter()
            self._judge = JudgePool(self.cfg, self.cfg.ray.cpus_per_actor)
            print(f"[{self.stage}] judge pool: {len(self._judge.actors)} actor(s) ({self.cfg.judge.backend}) ready in "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
        return self._judge

    def rollout(self, model_path: str, cfg=None):
        """The rollout group serving `model_path` (started now, or the running one when it serves that model)."""
        if self._group is not None and self.model_path == model_path:
            return self._group
        self.release_rollout()
        from kardia_rl.cluster.rollout_group import RolloutGroup

        t0 = time.perf_counter()
        self._group = RolloutGroup(cfg or self.cfg, model_path, self.cfg.ray.cpus_per_actor)
        self.model_path, self.startup_s = model_path, time.perf_counter() - t0
        self.groups_started += 1
        print(f"[{self.stage}] rollout group: {len(self._group.actors)} actor(s) on {model_path} ready in "
              f"{self.startup_s:.1f}s", flush=True)
        return self._group

    def release_rollout(self) -> None:
        if self._group is not None:
            self._group.shutdown()
            self._group, self.model_path = None, None

    def close(self) -> None:
        """Release every pool of the stage (rollout group first: the judge may still be in use elsewhere)."""
        try:
            self.release_rollout()
        finally:
            if self._judge is not None:
                self._judge.shutdown()
                self._judge = None

    def __enter__(self) -> "StagePools":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_scored(group, reward, samples: Sequence, prompt_ids: Sequence[list[int]], *, n: int, seed: int,
                    sampling: dict, progress: bool = True, desc: str = "") -> Rollout:
    """`samples` answered n times each on `group` and scored by `reward` (on the judge pool), in blocks (see
    the module docstring); one Rollout over all of them, prompt-major, timings summed over the blocks."""
    block = BLOCK_PER_ACTOR * len(group.actors)
    comps, rewards, timing = [], [], {"timing/generation": 0.0, "timing/judge": 0.0}
    for b, start in enumerate(range(0, len(samples), block)):
        part = generate_and_score(group, reward, samples[start:start + block], prompt_ids[start:start + block],
                                  n=n, seed=seed, step=b, sampling=sampling)
        comps.extend(part.completions)
        rewards.extend(part.rewards)
        for k in timing:
            timing[k] += part.timing.get(k, 0.0)
        if progress:
            done = min(len(samples), start + block)
            print(f"{desc}: {done}/{len(samples)} prompts x {n} answered and judged", file=sys.stderr, flush=True)
    return Rollout(list(samples), [list(p) for p in prompt_ids], comps, rewards, timing)


def load_tokenizer(model_path: str):
    """The model's tokenizer (prompt encoding only: no weights are loaded in the stage's process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
