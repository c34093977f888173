"""The learner: DeepSpeed engine wrapper for GRPO and SFT, batching of token ids, response logprobs.

Importing this package is light (no deepspeed/transformers import); `DeepSpeedLearner` is loaded lazily.
"""
from kardia_rl.learner.batching import (  # noqa: F401
    IGNORE_INDEX, collate_rollout, collate_sft, length_grouped_batches, pack_examples, rollout_micro_batches,
    shard_rows, sft_micro_batches)


def __getattr__(name):
    if name == "DeepSpeedLearner":
        from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

        return DeepSpeedLearner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DeepSpeedLearner", "IGNORE_INDEX", "collate_rollout", "collate_sft", "length_grouped_batches",
           "pack_examples", "rollout_micro_batches", "shard_rows", "sft_micro_batches"]
