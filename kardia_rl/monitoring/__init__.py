"""Monitoring of a GRPO run: metrics to JSONL / W&B / console (logger), the samples table (samples),
batch statistics (stats) and live reward-hacking alerts (alerts). Pure Python: no Ray, no torch."""
from kardia_rl.monitoring.alerts import ALERT_CODES, Alert, HackingMonitor, alert_metrics  # noqa: F401
from kardia_rl.monitoring.logger import MetricsLogger, read_metrics  # noqa: F401
from kardia_rl.monitoring.samples import (SAMPLE_COLUMNS, batch_sample_rows, read_samples,  # noqa: F401
                                        sample_rows, write_samples)
from kardia_rl.monitoring.stats import (latency_metrics, percentile, rollout_metrics, safe_mean,  # noqa: F401
                                        sample_std)
