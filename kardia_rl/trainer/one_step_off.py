"""The driver's rollout queue: each step's generation and judging runs in a background thread, at most
`algo.max_staleness` steps ahead of the learner (0 or 1).

- max_staleness=0: `take(t)` draws step t's prompts, starts their rollout and waits for it; `submit_ahead` does
  nothing. The step is the synchronous sequence generate -> judge -> update -> sync: the same calls, in the same
  order, with the same seeds, so it gives what the loop without a queue gave (tests/test_one_step_off.py compares
  the two over 8 steps).
- max_staleness=1: `take(t)` returns the rollout `submit_ahead(t - 1)` started during step t-1's update, and
  `submit_ahead(t)` starts step t+1's (its prompts drawn now) before step t's update. The driver calls
  `before_sync()` ahead of the weight sync after update t: it waits until that generation has finished (its
  judging may go on), so a weight update never lands in the middle of a batch and every sample comes from
  weights exactly 0 or 1 update old. The version of the weights each sample was generated with is recorded
  (`Rollout.policy_versions`: the step whose update they hold, 0 = the initial weights).

Faults: the generation runs without in-place actor restarts here (a replacement would be loaded with weights the
learner is still changing): a rollout actor that dies during an overlapped generation fails the step with the
actor's error as soon as Ray reports the death, and `checkpoint.auto_resume` restarts the run from its newest
checkpoint; every wait on the thread is bounded (twice rollout.actor_timeout_s) by one line naming the step.
Judge actors are restarted by the judge pool itself, as in the synchronous loop.

Resume: `state_dict()` names the prompts already drawn for the next step; `load_state_dict` regenerates exactly
those (with the restored weights) before drawing new ones, so no prompt is skipped or trained twice.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from kardia_rl.errors import KardiaError


class PendingRollout:
    """One step's generate_and_score running in a daemon thread (daemon: a SIGTERM-abandoned step must not
    hold the process at exit)."""

    def __init__(self, step: int, samples: list, version: int, run: Callable[["PendingRollout"], object]):
        self.step, self.samples, self.version = step, samples, version
        self.result, self.error = None, None
        self.generated, self.done = threading.Event(), threading.Event()
        self.started = time.perf_counter()
        self.generated_at = self.done_at = None
        self.reward_stats: dict = {}
        self._run = run
        self.thread = threading.Thread(target=self._work, name=f"rollout-step-{step}", daemon=True)
        self.thread.start()

    def mark_generated(self) -> None:
        self.generated_at = time.perf_counter()
        self.generated.set()

    def _work(self) -> None:
        try:
            self.result = self._run(self)
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, which raises it
            self.error = e
        finally:
            now = time.perf_counter()
            self.generated_at = self.generated_at or now
            self.done_at = now
            self.generated.set()
            self.done.set()

    def wait(self, event: threading.Event, timeout_s: float, what: str) -> None:
        if not event.wait(timeout_s):
            raise KardiaError(f"step {self.step}: the rollout did not finish {what} within {timeout_s:g}s (twice "
                              f"rollout.actor_timeout_s): a stuck engine or judge")
        if self.error is not None:
            raise self.error


class RolloutQueue:
    """Driver side of the one-step-off pipeline (see the module docstring)."""

    def __init__(self, max_staleness: int, prompts, samples: list, timeout_s: float,
                 start: Callable[[int, list, Callable[[], None]], object], reward_stats: Callable[[], dict]):
        self.max_staleness, self.prompts, self.timeout_s = max_staleness, prompts, 2 * float(timeout_s)
        self.by_id = {s.id: s for s in samples}
        self._start, self._reward_stats = start, reward_stats
        self.pending: Optional[PendingRollout] = None
        self.resume_ids: Optional[tuple[int, list]] = None  # (step, sample ids) drawn before a checkpoint
        self.engine_version = 0  # the step whose update the engines hold (set by the driver after each sync)
        self.busy: list[tuple[float, float]] = []  # (start, generated) of recent generations: rollout idle time

    # --- the step's phases --------------------------------------------------------------------------------
    def take(self, step: int, timing: dict, stop=None):
        """Step `step`'s scored rollout; `timing` gets the wait and how much judging was left exposed."""
        t = time.perf_counter()
        if self.pending is None or self.pending.step != step:
            self._submit(step)
        p, self.pending = self.pending, None
        try:
            p.wait(p.done, self.timeout_s, "generating and judging")
        except BaseException:
            self.pending = p  # what a SIGTERM abandoned stays recorded (state_dict) and is regenerated on resume
            raise
        end = time.perf_counter()
        self.busy.append((p.started, p.generated_at))
        timing["timing/rollout_wait"] = end - t
        timing["timing/judge_exposed"] = max(0.0, p.done_at - max(p.generated_at, t))
        rollout = p.result
        rollout.policy_versions = [p.version] * len(rollout.completions)
        rollout.reward_stats = p.reward_stats
        rollout.queue_wait = end - t
        return rollout

    def submit_ahead(self, step: int, last_step: int) -> None:
        """At max_staleness=1: start step+1's generation and judging now (before step's update)."""
        if self.max_staleness >= 1 and step < last_step:
            self._submit(step + 1)

    def before_sync(self) -> float:
        """Wait until the generation in flight (if any) has finished; returns the seconds waited."""
        t = time.perf_counter()
        if self.pending is not None:
            self.pending.wait(self.pending.generated, self.timeout_s, "generating")
        return time.perf_counter() - t

    def drain(self) -> None:
        """Wait for the rollout in flight to be fully judged (validation shares the judge pool)."""
        if self.pending is not None:
            self.pending.wait(self.pending.done, self.timeout_s, "judging")

    def rollout_idle(self, t0: float, t1: float) -> float:
        """Seconds of [t0, t1] in which no training generation was running."""
        spans = self.busy + ([(self.pending.started, self.pending.generated_at or t1)] if self.pending else [])
        busy = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans)
        self.busy = [(a, b) for a, b in self.busy if b > t1]
        return max(0.0, (t1 - t0) - busy)

    # --- checkpoint --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The prompts already drawn for a step not yet trained (None when none): a resume regenerates them."""
        if self.pending is not None:
            return {"step": self.pending.step, "ids": [s.id for s in self.pending.samples]}
        if self.resume_ids is not None:
            return {"step": self.resume_ids[0], "ids": list(self.resume_ids[1])}
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            return
        missing = [i for i in state["ids"] if i not in self.by_id]
        if missing:
            raise KardiaError(f"checkpoint: prompt {missing[0]!r} drawn for step {state['step']} is not in this run's "
                              "training prompts (the data changed since the checkpoint)")
        self.resume_ids = (int(state["step"]), list(state["ids"]))

    # --- internals ---------------------------------------------------------------------------------------
    def _submit(self, step: int) -> None:
        if self.resume_ids is not None and self.resume_ids[0] == step:
            samples, self.resume_ids = [self.by_id[i] for i in self.resume_ids[1]], None
        else:
            samples = self.prompts.next_batch()
        def run(p: PendingRollout):
            out = self._start(step, samples, p.mark_generated)
            p.reward_stats = self._reward_stats()  # this rollout's judging only: read before the next one starts
            return out

        p = PendingRollout(step, samples, self.engine_version, run)
        self.pending = p
