"""The sampled rater of the difficulty split: k answers per sample from a reference policy, scored by the unified
reward, and the resolution rate (the fraction of rewards >= split.reward_threshold). Its own module so both
split.py (a base reference) and crossfit.py (K warm-ups) use it without importing each other."""
from __future__ import annotations

import time
from typing import Sequence

from kardia_rl.data import TurnSample


def sample_rewards(cfg, samples: Sequence[TurnSample], model_path: str, *, progress: bool = True,
                   judge=None) -> tuple[dict[str, list[float]], dict]:
    """id -> the unified rewards of k sampled answers of the reference policy, and timing info."""
    from kardia_rl.data.encoding import encode_prompt
    from kardia_rl.engines import engine_from_config
    from kardia_rl.engines.generate import generate_chunked
    from kardia_rl.rewards.offline import close_judge, score_chunked
    from kardia_rl.rewards.unified import UnifiedReward

    k = cfg.split.k
    t0 = time.perf_counter()
    engine = engine_from_config(cfg, model_path)
    try:
        prompts = [encode_prompt(s, engine.tokenizer, cfg) for s in samples]
        t1 = time.perf_counter()
        groups = generate_chunked(engine, prompts, k, temperature=cfg.split.temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.model.max_new_tokens, seed=cfg.seed, greedy=False,
                                  progress=progress, desc=f"split: sample k={k}")
        gen_s = time.perf_counter() - t1
    finally:
        engine.shutdown()
    flat_samples = [s for s in samples for _ in range(k)]
    texts = [c.text for g in groups for c in g]
    own = judge is None
    reward = UnifiedReward.from_config(cfg, judge)
    judge = reward.judge
    try:
        t2 = time.perf_counter()
        breakdowns = score_chunked(reward, flat_samples, texts, [s.id for s in flat_samples], progress=progress,
                                   desc="split: score")
        score_s = time.perf_counter() - t2
    finally:
        if own:
            close_judge(judge)
    rewards = {s.id: [float(b.total) for b in breakdowns[i * k:(i + 1) * k]] for i, s in enumerate(samples)}
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    timing = {"engine": cfg.rollout.engine, "generation_s": round(gen_s, 3), "scoring_s": round(score_s, 3),
              "total_s": round(time.perf_counter() - t0, 3), "generated_tokens": tokens,
              "tokens_per_s": round(tokens / gen_s, 1) if gen_s > 0 else None,
              "malformed_rate": sum(b.parse_error is not None for b in breakdowns) / len(breakdowns),
              "judge_stats": reward.stats_summary()}
    return rewards, timing


def rates_from_rewards(rewards: dict[str, Sequence[float]], threshold: float) -> dict[str, float]:
    """Resolution rate per sample: the fraction of its rewards >= threshold."""
    return {i: sum(r >= threshold for r in rs) / len(rs) for i, rs in rewards.items()}
