"""Rewards of Kardia-R1: format, emotion, rubric judge, and the unified reward that combines them.

Pure Python/asyncio (no Ray): the Ray judge pool (cluster/judge_pool.py) serves a `JudgeBackend` from actors.
Importing this package is light (no torch, no sentence-transformers): the embedding judge and the LLM
chat backends load their heavy dependencies only when constructed.
"""
from kardia_rl.rewards.emotion_reward import (  # noqa: F401
    EMOTION_CLUSTERS, emotion_reward, emotion_score, emotion_similarity, predicted_emotion,
)
from kardia_rl.rewards.format_reward import format_reward, format_score, graded_format_score  # noqa: F401
from kardia_rl.rewards.judge import make_judge  # noqa: F401
from kardia_rl.rewards.judge.base import (  # noqa: F401
    DIMENSIONS, JudgeBackend, Judgment, JudgeRequest, aggregate_scores,
)
from kardia_rl.rewards.judge.cache import JudgmentCache  # noqa: F401
from kardia_rl.rewards.judge.rubric import RubricJudge  # noqa: F401
from kardia_rl.rewards.unified import RewardBreakdown, UnifiedReward, summary  # noqa: F401
