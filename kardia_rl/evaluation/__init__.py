"""Evaluation: the harness (`kardia-rl eval`), judge agreement (`kardia-rl judge-agreement`) and reports.

In-process (no Ray). Importing this package is light: engines, judges and matplotlib load inside the
functions that need them.
"""
from kardia_rl.evaluation.agreement import (  # noqa: F401
    agreement_report, dimension_agreement, quadratic_weighted_kappa, spearman, to_rating,
)
from kardia_rl.evaluation.harness import load_eval_samples, run_eval  # noqa: F401
from kardia_rl.rewards.answer_metrics import distinct_n, recompute_metrics  # noqa: F401
