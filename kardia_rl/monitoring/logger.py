"""Step metrics to `run_dir/metrics.jsonl`, W&B and the console.

- metrics.jsonl: one JSON object per step, `{"step": k, "train/policy_loss": ..., ...}`, appended, flushed
  and fsynced line by line, so a killed run loses at most the line being written. It is the
  machine-readable record: W&B offline runs have no readable summary in this wandb version. Non-finite
  values are written as null (JSON has no NaN) and reported on the console.
- Resume: the driver restores the checkpoint of step k and calls `truncate_after(k)`, which drops the lines
  (and sample files) of steps > k that the killed run wrote, so the resumed run never leaves duplicate or
  stale steps. Logging a step <= the last logged one raises instead of silently duplicating it.
- W&B: `wandb.init(mode=logging.wandb_mode, project=..., dir=run_dir, config=<the whole config>)`, resumed
  under the run id kept in `run_dir/wandb_run_id.txt`. W&B cannot rewind a run's history: on an online
  resume it keeps the killed run's points for steps > k and warns about (and drops) the re-logged ones;
  the JSONL is exact. Scalars and the samples table go to W&B every `logging.log_every` steps (and at
  the last step); the JSONL gets every step.
- Console: a tqdm bar over `algo.num_steps` with the key numbers when the stream is a terminal, else (Ray
  job logs, CI) one plain line per logged step, which reads better in a log file than carriage returns.
  Alerts print as their own lines.
"""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from typing import Any, Mapping, Optional, Sequence

from kardia_rl.config import to_dict
from kardia_rl.config.schema import WANDB_MODES
from kardia_rl.data.sources import iter_jsonl
from kardia_rl.errors import ConfigError, DataError, KardiaError
from kardia_rl.monitoring.alerts import Alert, alert_metrics
from kardia_rl.monitoring.samples import remove_samples_after, wandb_table, write_samples
from kardia_rl.utils.io import atomic_write_jsonl, atomic_write_text

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"

#: (metric key, console label, format) of the numbers on the progress line.
CONSOLE_KEYS = (("rollout/reward_mean", "reward", "{:.3f}"), ("rollout/format_rate", "format", "{:.2f}"),
                ("rollout/emotion_acc", "emo_acc", "{:.2f}"), ("train/kl", "kl", "{:.4f}"),
                ("timing/step", "step_s", "{:.2f}"))


def _clean(key: str, value: Any):
    """A metric value as a JSON scalar: numbers stay numbers (tensor/numpy scalars unwrapped), non-finite
    floats become None, strings pass; anything else is a caller bug named by its key."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            raise KardiaError(f"metric {key!r}: expected a scalar, got an array/tensor of shape "
                              f"{getattr(value, 'shape', '?')}") from None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise KardiaError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}")


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl. A torn LAST line (the process died mid-write) is ignored; a bad line
    elsewhere is corruption and raises with its line number."""
    rows = []
    for n, row in iter_jsonl(path, "corrupt metrics line", torn_tail=True):
        if not isinstance(row.get("step"), int):
            raise DataError(f"{path}:{n}: corrupt metrics line: not an object with an integer 'step'")
        rows.append(row)
    return rows


class MetricsLogger:
    """Usage in the driver: `logger.log(step, metrics, alerts=monitor.update(step, metrics), samples=rows)`
    once per step; `logger.truncate_after(k)` after resuming from step k; `logger.close()` at the end."""

    def __init__(self, run_dir: str, cfg, resume: bool = False, console: bool = True, stream=None):
        self.run_dir = run_dir
        self.cfg = cfg
        self.resume = resume
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.log_every = max(1, int(cfg.logging.log_every))
        self.num_steps = int(cfg.algo.num_steps)
        self.stream = stream if stream is not None else sys.stdout
        self.console = console
        self._bar = None
        os.makedirs(run_dir, exist_ok=True)

        self.last_step: Optional[int] = None
        if resume and os.path.exists(self.path):
            rows = read_metrics(self.path)
            atomic_write_jsonl(self.path, rows)  # drops a torn last line before appending after it
            self.last_step = rows[-1]["step"] if rows else None
        elif not resume:
            # A fresh run owns its directory's metrics: never mix two runs' steps in one file.
            if os.path.exists(self.path):
                os.unlink(self.path)
            remove_samples_after(run_dir, None)
        self._file = open(self.path, "a", encoding="utf-8")

        self.wandb_run = None
        self.wandb_error: Optional[str] = None
        self._init_wandb()
        if console and hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.num_steps, initial=self.last_step or 0, desc="GRPO", file=self.stream,
                             dynamic_ncols=True)

    # ---- W&B ----

    def _init_wandb(self) -> None:
        mode = self.cfg.logging.wandb_mode
        if mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb_mode={mode!r}: expected one of {WANDB_MODES}")
        if mode == "disabled":
            return
        id_path = os.path.join(self.run_dir, WANDB_ID_FILE)
        run_id = None
        if self.resume and os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip() or None
        # W&B ids may hold letters, digits, '-' and '_'; a random hex id avoids wandb's private helpers.
        run_id = run_id or uuid.uuid4().hex[:12]
        atomic_write_text(id_path, run_id + "\n")
        try:
            import wandb

            self.wandb_run = wandb.init(mode=mode, project=self.cfg.logging.wandb_project, dir=self.run_dir,
                                        config=to_dict(self.cfg), id=run_id, resume="allow",
                                        name=os.path.basename(os.path.abspath(self.run_dir)))
        except Exception as e:  # noqa: BLE001 - a logging backend must not kill a training run
            self.wandb_error = f"{type(e).__name__}: {e}"
            self._print(f"[warning] W&B ({mode}) could not start: {self.wandb_error}; metrics still go to "
                        f"{self.path}")

    @property
    def wandb_dir(self) -> Optional[str]:
        """The local W&B run folder (offline: what `wandb sync` uploads)."""
        return os.path.dirname(self.wandb_run.dir) if self.wandb_run is not None else None

    # ---- logging ----

    def is_logging_step(self, step: int) -> bool:
        """Steps whose scalars and samples table go to W&B (the JSONL gets every step)."""
        return step % self.log_every == 0 or step == self.num_steps

    def log(self, step: int, metrics: Mapping[str, Any], alerts: Optional[Sequence[Alert]] = None,
            samples: Optional[Sequence[Mapping]] = None) -> dict:
        """Record one step. `alerts` (from HackingMonitor.update) adds `monitor/<code>` keys and prints each
        alert; `samples` (rows from samples.sample_rows) is written on logging steps. Returns the row
        written to the JSONL."""
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise KardiaError(f"{self.path}: step {step} is not after the last logged step {self.last_step} "
                              f"(after a resume, call truncate_after(<resumed step>) first)")
        if "step" in metrics:
            raise KardiaError("metrics must not contain the key 'step' (the logger adds it)")
        merged = dict(metrics)
        if alerts is not None:
            merged.update(alert_metrics(alerts))
        row = {"step": step}
        nonfinite = []
        for k, v in merged.items():
            if not isinstance(k, str):
                raise KardiaError(f"metric keys must be strings, got {k!r}")
            row[k] = _clean(k, v)
            if row[k] is None and v is not None:
                nonfinite.append(k)
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.last_step = step

        logging_step = self.is_logging_step(step)
        if samples is not None and logging_step:
            write_samples(self.run_dir, step, samples)
        if self.wandb_run is not None and logging_step:
            payload = {k: v for k, v in row.items() if k != "step" and v is not None}
            if samples is not None:
                payload["samples"] = wandb_table(samples)
            self.wandb_run.log(payload, step=step)
        if nonfinite:
            self._print(f"[warning step {step}] non-finite metrics (written as null): {', '.join(nonfinite)}")
        for a in alerts or ():
            self._print(a.line())
        self._progress(step, row, logging_step)
        return row

    def truncate_after(self, step: int) -> int:
        """Drop metrics lines and sample files of steps > `step` (resuming from the checkpoint of `step`).
        Returns how many metric lines were removed."""
        step = int(step)
        self._file.close()
        rows = read_metrics(self.path) if os.path.exists(self.path) else []
        kept = [r for r in rows if r["step"] <= step]
        atomic_write_jsonl(self.path, kept)
        remove_samples_after(self.run_dir, step)
        self._file = open(self.path, "a", encoding="utf-8")
        self.last_step = kept[-1]["step"] if kept else None
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()
        return len(rows) - len(kept)

    # ---- console ----

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        elif self.console:
            print(line, file=self.stream, flush=True)

    def _summary(self, row: Mapping) -> str:
        parts = []
        for key, label, fmt in CONSOLE_KEYS:
            v = row.get(key)
            parts.append(f"{label} {fmt.format(v) if isinstance(v, (int, float)) else '-'}")
        return " | ".join(parts)

    def _progress(self, step: int, row: Mapping, logging_step: bool) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._summary(row), refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.console and logging_step:
            self._print(f"[step {step}/{self.num_steps}] {self._summary(row)}")

    def close(self) -> None:
        """Flush and close everything (idempotent)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
