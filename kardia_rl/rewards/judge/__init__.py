"""Judge backends behind one interface (base.py): `make_judge(cfg.judge)` (factory.py) picks one.

- embedding: EmbeddingJudge, an offline MiniLM proxy (NOT the paper's judge; see embedding.py);
- vllm / openai / hf: RubricJudge (rewards/judge/rubric.py) around a ChatBackend from the sibling module.
The judgment cache (cache.py) serves both.
"""
from __future__ import annotations

from kardia_rl.rewards.judge.base import (  # noqa: F401
    DIMENSIONS, SCORE_MAX, SCORE_MIN, ChatBackend, ChatRequestError, JudgeBackend, Judgment, JudgeRequest,
    RetryPolicy, aggregate_scores, failed_judgment,
)
from kardia_rl.rewards.judge.factory import JUDGE_BACKENDS, make_chat_backend, make_judge  # noqa: F401
