"""The distributed GRPO trainer: Ray actors (rollout, judge, learner) and the driver that coordinates them."""
