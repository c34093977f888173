"""Live reward-hacking alerts: the Kardia-R1 paper's failure signatures, checked after every GRPO step.

The paper names what going wrong looks like (method.md, "Known weak points"); each becomes a rule on
the step's metrics (key names from stats.rollout_metrics and the learner):

- format_drop (rollout/format_rate): best rolling mean so far - current rolling mean > format_drop.
- emotion_up_empathy_down (rollout/emotion_acc, judge/empathy_mean): against the baseline, emotion accuracy
  up by > emotion_rise AND empathy (1-5 scale) down by > empathy_fall.
- safety_drop (judge/safety_mean, 1-5): (baseline - current) / 4, i.e. on the normalised [0, 1] scale,
  > safety_drop.
- judge_no_spread (judge/rubric_group_std_mean): < min_judge_spread on `spread_steps` consecutive steps.
- length_collapse / length_explosion (rollout/response_len_mean): current / baseline < 1 / length_ratio,
  or > length_ratio.
- kl_high (train/kl): the raw step value > max_kl (KL blow-ups are sudden; no smoothing).
- mismatch_growth (rollout/mismatch_kl, engine vs learner log-probs): rolling mean > mismatch_growth x the
  baseline (floored at MISMATCH_FLOOR, so a float32 run's ~1e-6 noise does not count as growth). One-step-off
  training (algo.max_staleness=1) puts the staleness into this number; a growing one means the behaviour policy
  drifts from the learner faster than the truncated IS weight can correct.

"Rolling mean" = the mean over the last `window` steps (3 by default), so one noisy batch of 32 answers
does not raise an alarm; "baseline" = the mean of the first `window` steps the metric was seen; trend
rules wait until the current window no longer overlaps the baseline (2 * window steps), so a drift is
compared with where the run started rather than with itself.

Each alert fires once per episode: after it fires it stays silent until its condition has been false at
least once (re-arm), so a persistent problem prints one line, not one per step. A step where a rule's
metric is missing (e.g. no judged candidates) neither fires nor re-arms it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from kardia_rl.errors import ConfigError, KardiaError

ALERT_CODES: tuple[str, ...] = ("format_drop", "emotion_up_empathy_down", "safety_drop", "judge_no_spread",
                                "length_collapse", "length_explosion", "kl_high", "mismatch_growth")

#: Metrics the rules read (tracked with baseline / rolling windows).
TRACKED = {"format": "rollout/format_rate", "emotion": "rollout/emotion_acc",
           "empathy": "judge/empathy_mean", "safety": "judge/safety_mean",
           "length": "rollout/response_len_mean", "mismatch": "rollout/mismatch_kl"}
MISMATCH_FLOOR = 1e-3  # KL(engine || learner) below this is kernel noise, whatever its growth factor
SPREAD_KEY = "judge/rubric_group_std_mean"
KL_KEY = "train/kl"

@dataclass(frozen=True)
class Alert:
    step: int
    code: str
    message: str

    def line(self) -> str:
        """The console line: `[alert step 12] code: message`."""
        return f"[alert step {self.step}] {self.code}: {self.message}"

    def as_dict(self) -> dict:
        return asdict(self)


def alert_metrics(alerts) -> dict[str, float]:
    """`monitor/<code>`: 1.0 for the alerts that fired this step, 0.0 for every other code (so a W&B chart
    of each alert is a flat line with spikes where it fired)."""
    fired = {a.code for a in alerts}
    return {f"monitor/{c}": float(c in fired) for c in ALERT_CODES}


class _Series:
    """First `window` values (the baseline), the last `window` values, and the best rolling mean."""

    def __init__(self, window: int):
        self.window = window
        self.first: list[float] = []
        self.recent: list[float] = []
        self.count = 0
        self.best: Optional[float] = None

    def add(self, v: float) -> None:
        self.count += 1
        if len(self.first) < self.window:
            self.first.append(v)
        self.recent = (self.recent + [v])[-self.window:]
        cur = self.current()
        if cur is not None and (self.best is None or cur > self.best):
            self.best = cur

    def baseline(self) -> Optional[float]:
        return sum(self.first) / len(self.first) if len(self.first) == self.window else None

    def current(self) -> Optional[float]:
        return sum(self.recent) / len(self.recent) if len(self.recent) == self.window else None

    def trend_ready(self) -> bool:
        """The current window no longer overlaps the baseline window."""
        return self.count >= 2 * self.window

    def state(self) -> dict:
        return {"first": list(self.first), "recent": list(self.recent), "count": self.count, "best": self.best}

    def load(self, st: Mapping) -> None:
        self.first, self.recent = [float(x) for x in st["first"]], [float(x) for x in st["recent"]]
        self.count, self.best = int(st["count"]), st["best"]


def _value(metrics: Mapping[str, Any], key: str) -> Optional[float]:
    v = metrics.get(key)
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise KardiaError(f"monitor: metric {key!r} must be a number, got {v!r}") from None
    return f if math.isfinite(f) else None


class HackingMonitor:
    """Feed it each step's metrics; it returns the alerts that fire at that step (see the module doc)."""

    def __init__(self, cfg):
        self.format_drop = float(cfg.format_drop)
        self.safety_drop = float(cfg.safety_drop)
        self.min_judge_spread = float(cfg.min_judge_spread)
        self.length_ratio = float(cfg.length_ratio)
        self.max_kl = float(cfg.max_kl)
        self.window = int(cfg.window)
        self.emotion_rise = float(cfg.emotion_rise)
        self.empathy_fall = float(cfg.empathy_fall)
        self.spread_steps = int(cfg.spread_steps)
        self.mismatch_growth = float(cfg.mismatch_growth)
        bad = [f"monitor.{k}={v!r}: must be > 0" for k, v in
               [("format_drop", self.format_drop), ("safety_drop", self.safety_drop),
                ("mismatch_growth", self.mismatch_growth),
                ("max_kl", self.max_kl), ("emotion_rise", self.emotion_rise), ("empathy_fall", self.empathy_fall)]
               if not v > 0]
        if self.min_judge_spread < 0:
            bad.append(f"monitor.min_judge_spread={self.min_judge_spread!r}: must be >= 0")
        if not self.length_ratio > 1:
            bad.append(f"monitor.length_ratio={self.length_ratio!r}: must be > 1 (a factor of change)")
        if self.window < 1 or self.spread_steps < 1:
            bad.append(f"monitor.window={self.window!r} / monitor.spread_steps={self.spread_steps!r}: must be >= 1")
        if bad:
            raise ConfigError("; ".join(bad))
        self.series = {name: _Series(self.window) for name in TRACKED}
        self.armed = {c: True for c in ALERT_CODES}
        self.low_spread_streak = 0
        self.last_step: Optional[int] = None
        self.history: list[Alert] = []

    # ---- the rules: each returns (condition, message) or None when its metrics are missing ----

    def _format(self):
        s = self.series["format"]
        cur = s.current()
        if cur is None or s.best is None:
            return None
        return (s.best - cur > self.format_drop,
                f"format-valid rate {s.best:.2f} -> {cur:.2f} (best vs last {self.window} steps) — answers are "
                f"losing the four-span structure; SFT may have been too short or the format weight is too low "
                f"(paper: format violations)")

    def _emotion_empathy(self):
        e, p = self.series["emotion"], self.series["empathy"]
        if not (e.trend_ready() and p.trend_ready()):
            return None
        e0, e1, p0, p1 = e.baseline(), e.current(), p.baseline(), p.current()
        return (e1 - e0 > self.emotion_rise and p0 - p1 > self.empathy_fall,
                f"emotion acc {e0:.2f} -> {e1:.2f} while empathy {p0:.1f} -> {p1:.1f} — the emotion reward may "
                f"be gamed (paper: high emotion accuracy with low empathy)")

    def _safety(self):
        s = self.series["safety"]
        if not s.trend_ready():
            return None
        b, c = s.baseline(), s.current()
        return ((b - c) / 4.0 > self.safety_drop,
                f"safety {b:.2f} -> {c:.2f} on the 1-5 scale (a fall of {(b - c) / 4.0:.2f} normalised) — the KL "
                f"penalty may be too weak (paper: safety falling during RL)")

    def _spread(self, spread: Optional[float]):
        if spread is None:
            return None
        return (self.low_spread_streak >= self.spread_steps,
                f"within-group judge spread {spread:.4f} < {self.min_judge_spread} for {self.low_spread_streak} "
                f"steps — the judge no longer discriminates between candidates, so the rubric gives GRPO no "
                f"signal (paper: correctly structured but generic responses)")

    def _length(self):
        s = self.series["length"]
        if not s.trend_ready():
            return None
        b, c = s.baseline(), s.current()
        ratio = c / b if b > 0 else math.inf
        return ratio, b, c

    def _kl(self, kl: Optional[float]):
        if kl is None:
            return None
        return (kl > self.max_kl,
                f"KL to the reference {kl:.3f} > {self.max_kl} — the policy is drifting far from the reference; "
                f"raise algo.kl_beta or lower learner.lr")

    def _mismatch(self):
        s = self.series["mismatch"]
        if not s.trend_ready():
            return None
        b, c = s.baseline(), s.current()
        return (c > self.mismatch_growth * max(b, MISMATCH_FLOOR),
                f"engine/learner mismatch KL {b:.2e} -> {c:.2e} (over x{self.mismatch_growth:g} its first "
                f"{self.window} steps) — stale or drifting rollout log-probs; with algo.max_staleness=1 try 0, "
                f"or check the weight sync")

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Alert]:
        """Record `metrics` of `step` and return the alerts that fire now (each once per episode)."""
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise KardiaError(f"monitor: step {step} after step {self.last_step}; steps must increase "
                              f"(on resume, load the monitor state saved with the checkpoint of that step)")
        self.last_step = step
        for name, key in TRACKED.items():
            v = _value(metrics, key)
            if v is not None:
                self.series[name].add(v)
        spread = _value(metrics, SPREAD_KEY)
        if spread is not None:
            self.low_spread_streak = self.low_spread_streak + 1 if spread < self.min_judge_spread else 0

        results: dict[str, Optional[tuple]] = {
            "format_drop": self._format(),
            "emotion_up_empathy_down": self._emotion_empathy(),
            "safety_drop": self._safety(),
            "judge_no_spread": self._spread(spread),
            "kl_high": self._kl(_value(metrics, KL_KEY)),
            "mismatch_growth": self._mismatch(),
        }
        length = self._length()
        if length is None:
            results["length_collapse"] = results["length_explosion"] = None
        else:
            ratio, b, c = length
            results["length_collapse"] = (
                ratio < 1.0 / self.length_ratio,
                f"mean response length {b:.1f} -> {c:.1f} tokens (x{ratio:.2f}) — answers are collapsing; "
                f"a reward may favour empty or minimal answers")
            results["length_explosion"] = (
                ratio > self.length_ratio,
                f"mean response length {b:.1f} -> {c:.1f} tokens (x{ratio:.2f}) — answers are exploding "
                f"(check rollout/truncated_rate); the judge may reward verbosity")

        fired = []
        for code in ALERT_CODES:
            res = results[code]
            if res is None:  # metric missing: neither fire nor re-arm
                continue
            cond, message = res
            if cond and self.armed[code]:
                self.armed[code] = False
                fired.append(Alert(step, code, message))
            elif not cond:
                self.armed[code] = True
        self.history.extend(fired)
        return fired

    def state_dict(self) -> dict:
        """JSON-serialisable state, saved with each checkpoint so a resumed run alerts exactly like an
        uninterrupted one."""
        return {"series": {k: s.state() for k, s in self.series.items()}, "armed": dict(self.armed),
                "low_spread_streak": self.low_spread_streak, "last_step": self.last_step,
                "history": [a.as_dict() for a in self.history], "window": self.window}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state.get("window", self.window)) != self.window:
            raise KardiaError(f"monitor state was saved with window={state.get('window')}, but this run uses "
                              f"window={self.window}; resume with the same monitor settings")
        for k, s in self.series.items():
            if k in state["series"]:  # a checkpoint older than a tracked metric starts that one afresh
                s.load(state["series"][k])
        self.armed = {c: bool(state["armed"].get(c, True)) for c in ALERT_CODES}
        self.low_spread_streak = int(state["low_spread_streak"])
        self.last_step = state["last_step"]
        self.history = [Alert(int(a["step"]), a["code"], a["message"]) for a in state.get("history", [])]
