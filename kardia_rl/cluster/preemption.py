"""Stopping and restarting a GRPO run without losing work.

- `StopSignal`: SIGTERM (a preempted node, `ray job stop`, a cluster scheduler's grace period). Inside
  `abandonable()` (the driver's generation and judging, minutes per step on a large model) the handler raises
  `Abandoned`: that work is dropped and the driver checkpoints the learner at once, which between updates holds
  the last completed step, so the stop needs about one checkpoint save of grace. Elsewhere (the update, the weight
  sync, the checkpoint: the learner's state is changing) it only sets a flag; the driver finishes the step and
  checkpoints at its end. Either way `Preempted` follows, whose one line says where the checkpoint is and how to
  continue (`kardia-rl train` exits 143, like `kardia-rl synthesize`). A second SIGTERM falls back to the default
  action (terminate now), so an impatient operator can still kill the job.
- `retryable(exc)`: the failures that `checkpoint.auto_resume` restarts from the newest intact checkpoint: a
  dead or unreachable Ray actor (a learner rank, an engine, a judge), lost objects, and rollout actors that died
  more often in a step than rollout.max_restarts_per_step mends in place (`ActorLost`). Programming errors are
  not retried: they would fail the same way again.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

from kardia_rl.errors import KardiaError


class Preempted(KardiaError):
    """The run stopped on SIGTERM after writing a checkpoint at a step boundary."""

    def __init__(self, step: int, checkpoint: Optional[str], run_dir: str):
        self.step, self.checkpoint = step, checkpoint
        if checkpoint is None:
            super().__init__(f"stopped by SIGTERM before the first step completed: nothing to save; start again with "
                             f"the same command (run_dir={run_dir})")
            return
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {checkpoint} written; continue with the "
                         f"same command plus checkpoint.resume=true (run_dir={run_dir})")


class Abandoned(BaseException):
    """Raised by the SIGTERM handler inside `StopSignal.abandonable()`. A BaseException, like KeyboardInterrupt:
    code that catches Exception on the way (retries, fallbacks) must not swallow it."""


class StopSignal:
    """Context manager: while active, the first SIGTERM sets `requested` instead of killing the process."""

    def __init__(self, message: str = "finishing this step, then checkpoint and stop"):
        self.requested = False
        self.message = message  # what the process does next, printed when the first SIGTERM arrives
        self._previous = None
        self._abandonable = False

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second SIGTERM: stop waiting for the step boundary
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
            return
        self.requested = True
        if self._abandonable:
            print("[signal] SIGTERM received: abandoning this step's generation and judging; checkpointing the last "
                  "completed step, then stopping", flush=True)
            raise Abandoned()
        print(f"[signal] SIGTERM received: {self.message}", flush=True)

    @contextlib.contextmanager
    def abandonable(self):
        """Work that a SIGTERM may cut short (see the module docstring); only the main thread is interrupted."""
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False

    def __enter__(self) -> "StopSignal":
        # Signal handlers can only be installed from the main thread (a driver run inside a worker thread, e.g. in
        # a test or a notebook, keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class ActorLost(KardiaError):
    """Actors died more often in one step than is mended in place (rollout.max_restarts_per_step): one line naming
    the actor, and a failure `checkpoint.auto_resume` restarts from the newest checkpoint."""


def retryable(exc: BaseException) -> bool:
    try:
        from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError
    except ImportError:  # pragma: no cover - ray is a core dependency
        return False
    return isinstance(exc, (RayActorError, ActorUnavailableError, ObjectLostError, ActorLost))
