"""The sampled rater of the difficulty split: k answers per sample from a reference policy, scored by the unified
reward, and the resolution rate (the fraction of rewards >= split.reward_threshold). Its own module so both
split.py (a base reference) and crossfit.py (K warm-ups) use it without importing each other."""
from __future__ import annotations

import time
from typing import Sequence

from kardia_rl.data import TurnSample


def sample_rewards(cfg, samples: Sequence[TurnSample], model_path: str, *, progress: bool = True,
                   pools=None) -> tuple[dict[str, list[float]], dict]:
    """id -> the unified rewards of k sampled answers of the reference policy, and timing info.

    Generated on a rollout group for `model_path` (divided over every rollout actor) and judged on the judge
    pool, both from `pools` (cluster.stage_pools.StagePools: the caller's, reused across folds; else this
    call's own, released before it returns)."""
    from kardia_rl.cluster.stage_pools import StagePools, generate_scored, load_tokenizer
    from kardia_rl.data.encoding import encode_prompt
    from kardia_rl.rewards.unified import UnifiedReward

    k = cfg.split.k
    t0 = time.perf_counter()
    own = pools is None
    pools = pools or StagePools(cfg, "split")
    try:
        tokenizer = load_tokenizer(model_path)
        prompts = [encode_prompt(s, tokenizer, cfg) for s in samples]
        group = pools.rollout(model_path)
        reward = UnifiedReward.from_config(cfg, pools.judge)
        t1 = time.perf_counter()
        res = generate_scored(group, reward, list(samples), prompts, n=k, seed=cfg.seed,
                              sampling={"temperature": cfg.split.temperature, "greedy": False}, progress=progress,
                              desc=f"split: sample k={k} on {model_path}")
        rate_s = time.perf_counter() - t1
    finally:
        if own:
            pools.close()
    breakdowns = res.rewards
    rewards = {s.id: [float(b.total) for b in breakdowns[i * k:(i + 1) * k]] for i, s in enumerate(samples)}
    tokens = sum(len(c.token_ids) for c in res.completions)
    gen_s = res.timing["timing/generation"]
    timing = {"engine": cfg.rollout.engine, "rollout_actors": cfg.rollout.num_actors,
              "judge_actors": cfg.judge.num_actors, "generation_s": round(gen_s, 3),
              "scoring_s": round(res.timing["timing/judge"], 3), "rating_s": round(rate_s, 3),
              "total_s": round(time.perf_counter() - t0, 3), "generated_tokens": tokens,
              "tokens_per_s": round(tokens / gen_s, 1) if gen_s > 0 else None,
              "malformed_rate": sum(b.parse_error is not None for b in breakdowns) / len(breakdowns),
              "judge_stats": reward.stats_summary()}
    return rewards, timing


def rates_from_rewards(rewards: dict[str, Sequence[float]], threshold: float) -> dict[str, float]:
    """Resolution rate per sample: the fraction of its rewards >= threshold."""
    return {i: sum(r >= threshold for r in rs) / len(rs) for i, rs in rewards.items()}
