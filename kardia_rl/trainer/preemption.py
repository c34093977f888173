"""Stopping and restarting a GRPO run without losing work.

- `StopSignal`: SIGTERM (a preempted node, `ray job stop`, a cluster scheduler's grace period) only sets a flag;
  the driver finishes the step it is in, writes a checkpoint at that step boundary and raises `Preempted`, a
  user-facing error whose one line says where the checkpoint is and how to continue. A second SIGTERM while
  the step is still running falls back to the default action (terminate now), so an impatient operator can
  still kill the job.
- `retryable(exc)`: the failures that `checkpoint.auto_resume` restarts from the newest intact checkpoint: a
  dead or unreachable Ray actor (a learner rank, an engine, a judge) and lost objects. Programming errors are
  not retried: they would fail the same way again.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

from kardia_rl.errors import KardiaError


class Preempted(KardiaError):
    """The run stopped on SIGTERM after writing a checkpoint at a step boundary."""

    def __init__(self, step: int, checkpoint: Optional[str], run_dir: str):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {checkpoint} written; continue with the "
                         f"same command plus checkpoint.resume=true (run_dir={run_dir})")


class StopSignal:
    """Context manager: while active, the first SIGTERM sets `requested` instead of killing the process."""

    def __init__(self, message: str = "finishing this step, then checkpoint and stop"):
        self.requested = False
        self.message = message  # what the process does next, printed when the first SIGTERM arrives
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second SIGTERM: stop waiting for the step boundary
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
            return
        self.requested = True
        print(f"[signal] SIGTERM received: {self.message}", flush=True)

    def __enter__(self) -> "StopSignal":
        # Signal handlers can only be installed from the main thread (a driver run inside a worker thread, e.g. in
        # a test or a notebook, keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def retryable(exc: BaseException) -> bool:
    try:
        from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError
    except ImportError:  # pragma: no cover - ray is a core dependency
        return False
    return isinstance(exc, (RayActorError, ActorUnavailableError, ObjectLostError))
