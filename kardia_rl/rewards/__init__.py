"""Rewards of Kardia-R1: format, emotion, rubric judge, and the unified reward that combines them.

Pure Python/asyncio (no Ray): the Ray judge pool wraps `UnifiedReward`/`JudgeBackend` in a later layer.
Importing this package is light (no torch, no sentence-transformers): the embedding judge and the LLM
chat backends load their heavy dependencies only when constructed.
"""
from kardia_rl.rewards.cache import JudgmentCache  # noqa: F401
from kardia_rl.rewards.emotion_reward import (  # noqa: F401
    EMOTION_CLUSTERS, emotion_reward, emotion_score, emotion_similarity, predicted_emotion,
)
from kardia_rl.rewards.format_reward import format_reward, format_score, graded_format_score  # noqa: F401
from kardia_rl.rewards.judge import make_judge  # noqa: F401
from kardia_rl.rewards.judge.base import DIMENSIONS, JudgeBackend, Judgment, JudgeRequest  # noqa: F401
from kardia_rl.rewards.rubric import RubricJudge, aggregate_scores  # noqa: F401
from kardia_rl.rewards.unified import RewardBreakdown, UnifiedReward, summary  # noqa: F401
