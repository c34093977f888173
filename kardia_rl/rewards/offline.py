"""Scoring outside the training loop (eval, the split's rater, judge agreement): UnifiedReward in chunks with a
progress bar, and closing the judge afterwards. Here, below evaluation/ and curriculum/, so both use one kit."""
from __future__ import annotations

from typing import Any, Sequence

SCORE_CHUNK = 64  # answers per score call: bounds the judge's queue and gives the progress bar something to count


def score_chunked(reward, samples: Sequence[Any], completions: Sequence[str], group_ids: Sequence[str], *,
                  progress: bool, desc: str) -> list:
    """UnifiedReward.score_sync in chunks (progress bar); group ids keep the neutral fallback per sample."""
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=len(samples), desc=desc, unit="answer", disable=not progress, leave=False) as bar:
        for start in range(0, len(samples), SCORE_CHUNK):
            end = start + SCORE_CHUNK
            out.extend(reward.score_sync(samples[start:end], completions[start:end], group_ids[start:end]))
            bar.update(len(samples[start:end]))
    return out


def close_judge(judge) -> None:
    """Release a judge from synchronous code (an LLM judge frees its engine before the next one loads)."""
    import asyncio

    asyncio.run(judge.close())
