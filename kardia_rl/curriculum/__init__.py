"""The difficulty-aware curriculum: easy samples (resolution rate >= tau) for SFT, hard ones for GRPO."""
from kardia_rl.curriculum.split import (  # noqa: F401
    apply_tau, data_rate, data_rates, load_split_data, rates_from_rewards, sample_rewards, split_samples,
)
