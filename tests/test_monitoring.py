"""Monitoring: metrics.jsonl + resume truncation, W&B offline, samples table, batch stats, hacking alerts."""
from __future__ import annotations

import glob
import io
import json
import math
import os

import pytest

from kardia_rl.config import KardiaConfig
from kardia_rl.errors import ConfigError, KardiaError
from kardia_rl.format.spans import render_spans
from kardia_rl.monitoring import (ALERT_CODES, SAMPLE_COLUMNS, HackingMonitor, MetricsLogger, batch_sample_rows,
                                  percentile, read_metrics, read_samples, rollout_metrics, sample_rows)
from kardia_rl.monitoring.stats import ZERO_STD_TOL, latency_metrics, safe_mean


def _cfg(mode="disabled", num_steps=6, log_every=1):
    cfg = KardiaConfig()
    cfg.logging.wandb_mode = mode
    cfg.logging.log_every = log_every
    cfg.algo.num_steps = num_steps
    return cfg


def _rewards():
    """Two groups of two. Group 1 judged; group 2 malformed (never judged), tied rewards."""
    return [
        {"total": 1.0, "format": 1.0, "emotion": 1.0, "rubric": 0.5, "dims": {"empathy": 3, "safety": 5},
         "rationale": {"empathy": "names the fear", "safety": "fine"}},
        {"total": 0.5, "format": 1.0, "emotion": 0.0, "rubric": 0.75, "dims": {"empathy": 4, "safety": 5}},
        {"total": 0.0, "format": 0.0, "emotion": 0.0, "rubric": 0.0, "dims": {"empathy": None, "safety": None}},
        {"total": 0.0, "format": 0.5, "emotion": 0.5, "rubric": 0.0, "dims": {"empathy": None, "safety": None}},
    ]


# ---------------------------------------------------------------- stats

def test_rollout_metrics_hand_computed():
    m = rollout_metrics(_rewards(), 2, [10, 20, 30, 40], ["stop", "stop", "length", "stop"])
    expect = {
        "rollout/reward_mean": 0.375,
        "rollout/reward_std": math.sqrt(0.6875 / 3),  # deviations .625 .125 -.375 -.375, n-1 = 3
        "rollout/reward_min": 0.0, "rollout/reward_max": 1.0,
        "rollout/frac_zero_std": 0.5,  # group 2 is tied at 0
        "rollout/format_rate": 0.5,  # graded 0.5 is not "valid"
        "rollout/format_reward_mean": 0.625,
        "rollout/emotion_acc": 0.25, "rollout/emotion_reward_mean": 0.375,
        "rollout/rubric_mean": 0.3125,
        "rollout/response_len_mean": 25.0, "rollout/response_len_max": 40.0,
        "rollout/truncated_rate": 0.25,
        "judge/judged_frac": 0.5,
        "judge/empathy_mean": 3.5, "judge/safety_mean": 5.0,
        "judge/empathy_group_std_mean": 0.25 / math.sqrt(2),  # normalised 0.5, 0.75 in group 1 only
        "judge/safety_group_std_mean": 0.0,
        "judge/rubric_group_std_mean": 0.25 / math.sqrt(2),  # unjudged group 2 does not count
    }
    assert set(m) == set(expect)
    for k, v in expect.items():
        assert m[k] == pytest.approx(v), k


def test_stats_helpers_and_errors():
    assert percentile([4, 1, 3, 2, None], 50) == 2.5
    assert percentile([0, 10], 95) == pytest.approx(9.5)
    assert percentile([], 50) is None
    assert safe_mean([None, 1.0, float("nan"), 3.0]) == 2.0 and safe_mean([None]) is None
    lat = latency_metrics([0.1, 0.2, 0.3, 0.4, 1.0])
    assert lat["judge/latency_p50"] == pytest.approx(0.3) and lat["judge/latency_p95"] == pytest.approx(0.88)
    assert latency_metrics([]) == {}
    with pytest.raises(KardiaError, match="multiple of group_size=3"):
        rollout_metrics(_rewards(), 3, [1, 2, 3, 4])
    with pytest.raises(KardiaError, match="response lengths"):
        rollout_metrics(_rewards(), 2, [1, 2])
    assert "rollout/truncated_rate" not in rollout_metrics(_rewards(), 2, [1, 2, 3, 4])


def test_zero_std_tolerance_matches_advantages():
    from kardia_rl.algo.advantages import ZERO_STD_TOL as algo_tol

    assert ZERO_STD_TOL == algo_tol


# ---------------------------------------------------------------- samples

def test_sample_rows_have_every_column(tmp_path):
    good = render_spans("they feel unseen", "a move is lonely", "lonely", "That sounds hard.")
    rows = sample_rows(3, "I just moved.", [good, "no spans at all"], _rewards()[:2], [0.7, -0.7],
                       gold_emotion="lonely")
    assert [list(r) for r in rows] == [list(SAMPLE_COLUMNS)] * 2
    assert rows[0]["emotion"] == "lonely" and rows[0]["response"] == "That sounds hard."
    assert rows[0]["empathy"] == 3 and rows[0]["relevance"] is None and rows[0]["advantage"] == 0.7
    assert "empathy: names the fear" in rows[0]["rationale"]
    assert rows[1]["response"] == "no spans at all" and rows[1]["understanding"] == ""
    with pytest.raises(KardiaError, match="aligned"):
        sample_rows(3, "p", [good], _rewards()[:2], [0.0, 0.0])
    # A batch of two prompts x two candidates, table limited to one prompt.
    rows = batch_sample_rows(4, ["p0", "p1"], [good] * 4, _rewards(), [0.5, -0.5, 0.0, 0.0], 2, 1, ["sad", "x"])
    assert [(r["prompt"], r["candidate_idx"], r["gold_emotion"], r["reward"]) for r in rows] == \
        [("p0", 0, "sad", 1.0), ("p0", 1, "sad", 0.5)]
    with pytest.raises(KardiaError, match="2 prompts x group_size 2 != 3 completions"):
        batch_sample_rows(4, ["p0", "p1"], [good] * 3, _rewards()[:3], [0.0] * 3, 2, 1)


# ---------------------------------------------------------------- logger

def _metrics(step, scale=1.0):
    return {"train/policy_loss": -0.01 * step * scale, "rollout/reward_mean": 0.1 * step * scale,
            "rollout/format_rate": 0.9, "train/kl": 0.001, "timing/step": 1.5, "judge/failures": 0}


def test_metrics_jsonl_and_resume_truncation(tmp_path):
    run = str(tmp_path / "run")
    cfg = _cfg()
    out = io.StringIO()
    rows = sample_rows(0, "p", [render_spans("u", "r", "sad", "ok")] * 2, _rewards()[:2], [1.0, -1.0])
    log = MetricsLogger(run, cfg, resume=False, stream=out)
    for step in range(1, 6):
        m = _metrics(step)
        if step == 2:
            m["train/grad_norm"] = float("nan")
        log.log(step, m, alerts=[], samples=rows)
    with pytest.raises(KardiaError, match="not after the last logged step 5"):
        log.log(5, _metrics(5))
    log.close()
    got = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert got[2]["rollout/reward_mean"] == pytest.approx(0.3) and got[2]["monitor/kl_high"] == 0.0
    assert got[1]["train/grad_norm"] is None  # NaN -> null, and reported
    assert "non-finite metrics (written as null): train/grad_norm" in out.getvalue()
    assert "[step 3/6] reward 0.300 | format 0.90" in out.getvalue()
    assert len(glob.glob(os.path.join(run, "samples", "step_*.jsonl"))) == 5

    # The killed run also left a torn line; resume from the checkpoint of step 3.
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "train/pol')
    log = MetricsLogger(run, cfg, resume=True, stream=io.StringIO())
    assert log.last_step == 5
    assert log.truncate_after(3) == 2
    for step in (4, 5, 6):
        log.log(step, _metrics(step, scale=2.0), samples=rows)
    log.close()
    got = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert got[2]["rollout/reward_mean"] == pytest.approx(0.3)  # kept from the first run
    assert got[3]["rollout/reward_mean"] == pytest.approx(0.8)  # rewritten by the resumed run
    assert read_samples(run, 4)[0]["step"] == 0 and len(read_samples(run, 6)) == 2

    # A fresh (non-resume) run in the same directory starts a new record.
    with MetricsLogger(run, cfg, resume=False, stream=io.StringIO()) as log:
        log.log(1, _metrics(1))
    assert [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1]
    assert not glob.glob(os.path.join(run, "samples", "step_*.jsonl"))


def test_logger_rejects_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="wandb_mode='onlin'"):
        MetricsLogger(str(tmp_path), _cfg(mode="onlin"))
    with MetricsLogger(str(tmp_path), _cfg(), stream=io.StringIO()) as log:
        with pytest.raises(KardiaError, match="'train/x': expected a number"):
            log.log(1, {"train/x": [1, 2]})
        with pytest.raises(KardiaError, match="must not contain the key 'step'"):
            log.log(1, {"step": 1})
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(KardiaError, match=r"metrics.jsonl:2: corrupt"):
        read_metrics(str(tmp_path / "metrics.jsonl"))


def test_wandb_offline_run_and_resume_id(tmp_path):
    run = str(tmp_path / "run")
    cfg = _cfg(mode="offline", num_steps=2)
    rows = sample_rows(1, "p", [render_spans("u", "r", "sad", "ok")], _rewards()[:1], [0.0])
    log = MetricsLogger(run, cfg, resume=False, stream=io.StringIO())
    try:
        assert log.wandb_run is not None, f"wandb could not start offline: {log.wandb_error}"
        run_id = log.wandb_run.id
        log.log(1, _metrics(1), samples=rows)
        log.log(2, _metrics(2))
        wandb_dir = log.wandb_dir
    finally:
        log.close()
    assert os.path.isfile(os.path.join(wandb_dir, f"run-{run_id}.wandb"))
    assert glob.glob(os.path.join(wandb_dir, "files", "media", "table", "samples_*.table.json"))
    with open(os.path.join(run, "wandb_run_id.txt")) as f:
        assert f.read().strip() == run_id
    assert [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    log = MetricsLogger(run, cfg, resume=True, stream=io.StringIO())
    try:
        assert log.wandb_run is not None and log.wandb_run.id == run_id
    finally:
        log.close()


# ---------------------------------------------------------------- alerts

def _healthy(n=14):
    """A run that learns a little and stays well-behaved (small deterministic wiggles)."""
    series = []
    for i in range(n):
        w = (-1) ** i
        series.append({"rollout/format_rate": 0.9 + 0.03 * w, "rollout/emotion_acc": 0.30 + 0.01 * i,
                       "judge/empathy_mean": 3.5 + 0.02 * i + 0.05 * w, "judge/safety_mean": 4.6 + 0.05 * w,
                       "judge/rubric_group_std_mean": 0.08 + 0.01 * w, "rollout/response_len_mean": 30 + 2 * w,
                       "train/kl": 0.005 * (i + 1)})
    return series


def _run(series, cfg=None):
    mon = HackingMonitor(cfg or KardiaConfig().monitor)
    return mon, [a for step, m in enumerate(series, 1) for a in mon.update(step, m)]


def _after(step, key, value, n=14):
    s = _healthy(n)
    for m in s[step - 1:]:
        m[key] = value(m[key]) if callable(value) else value
    return s


@pytest.mark.parametrize("code,series,fire_step", [
    ("format_drop", _after(6, "rollout/format_rate", 0.5), 7),
    ("safety_drop", _after(7, "judge/safety_mean", 3.7), 8),
    ("judge_no_spread", _after(5, "judge/rubric_group_std_mean", 0.004), 6),
    ("length_collapse", _after(7, "rollout/response_len_mean", 5.0), 9),  # x0.41 at 8, x0.16 at 9
    ("length_explosion", _after(7, "rollout/response_len_mean", 150.0), 8),
    ("kl_high", _after(9, "train/kl", 0.8), 9),
])
def test_each_alert_fires_once_on_its_signature(code, series, fire_step):
    _, alerts = _run(series)
    assert [(a.code, a.step) for a in alerts] == [(code, fire_step)]


def test_emotion_up_empathy_down_and_message():
    s = _after(7, "rollout/emotion_acc", 0.62)
    for m in s[6:]:
        m["judge/empathy_mean"] = 2.7
    _, alerts = _run(s)
    # Baseline = steps 1-3 (acc 0.31, empathy 3.54); at step 7 the last three steps average acc 0.44 and
    # empathy 3.29: up 0.13 > 0.05 and down 0.24 > 0.1.
    assert [(a.code, a.step) for a in alerts] == [("emotion_up_empathy_down", 7)]
    line = alerts[0].line()
    assert line.startswith("[alert step 7] emotion_up_empathy_down: emotion acc 0.31 -> 0.44 while empathy "
                           "3.5 -> 3.3 — the emotion reward may be gamed")
    assert "paper: high emotion accuracy with low empathy" in line
    # Emotion rising alone is learning, not hacking.
    _, alerts = _run(_after(7, "rollout/emotion_acc", 0.62))
    assert alerts == []


def test_healthy_run_raises_no_alert():
    _, alerts = _run(_healthy(30))
    assert alerts == []


def test_alert_rearms_after_condition_clears_and_skips_missing():
    s = _healthy(16)
    for i in (3, 4, 10, 11):
        s[i]["judge/rubric_group_std_mean"] = 0.0  # two episodes of a silent judge
    s[6].pop("judge/rubric_group_std_mean")  # a step without judged candidates
    _, alerts = _run(s)
    assert [(a.code, a.step) for a in alerts] == [("judge_no_spread", 5), ("judge_no_spread", 12)]


def test_monitor_state_round_trip_and_errors():
    s = _after(7, "judge/safety_mean", 3.7, n=12)
    _, full = _run(s)
    first = HackingMonitor(KardiaConfig().monitor)
    part = [a for step, m in enumerate(s[:6], 1) for a in first.update(step, m)]
    resumed = HackingMonitor(KardiaConfig().monitor)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    part += [a for step, m in enumerate(s[6:], 7) for a in resumed.update(step, m)]
    assert part == full and len(full) == 1
    with pytest.raises(KardiaError, match="step 3 after step 12"):
        resumed.update(3, s[0])
    cfg = KardiaConfig().monitor
    cfg.length_ratio = 0.5
    with pytest.raises(ConfigError, match="monitor.length_ratio=0.5"):
        HackingMonitor(cfg)


def test_logger_prints_alerts_and_flags_them(tmp_path):
    mon = HackingMonitor(KardiaConfig().monitor)
    out = io.StringIO()
    with MetricsLogger(str(tmp_path), _cfg(num_steps=14), stream=out) as log:
        for step, m in enumerate(_after(9, "train/kl", 0.8), 1):
            log.log(step, m, alerts=mon.update(step, m))
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows if r["monitor/kl_high"] == 1.0] == [9]
    assert all(f"monitor/{c}" in rows[0] for c in ALERT_CODES)
    assert "[alert step 9] kl_high: KL to the reference 0.800 > 0.5" in out.getvalue()
