"""One-step-off training (algo.max_staleness, trainer/one_step_off.py): the config's rules and the mismatch alert
(quick); on the tiny model with real Ray actors, vLLM engines and a DeepSpeed learner: the queue at staleness 0
equals the loop without a queue over 8 steps, and at staleness 1 a job killed with -9 and resumed, and a rollout
actor killed during an overlapped generation, both train every prompt of the stream exactly once on samples at
most one update old."""
from __future__ import annotations

import os
import re
import subprocess
import time
from types import SimpleNamespace

import pytest
from conftest import local_ray
from fault_runs import ROOT, kardia_train, kill_job, metrics_by_step, steps, train_in_process, wait_for_step

ASYNC = ("algo.max_staleness=1", "algo.behaviour_logprobs=recompute")


# --- quick -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, says", [
    (("algo.max_staleness=1",), "needs algo.behaviour_logprobs"),
    (("algo.max_staleness=2",), "algo.max_staleness: must be in [0, 1], got 2"),
    (("algo.max_staleness=1", "algo.behaviour_logprobs=proximal"), "algo.behaviour_logprobs: 'proximal'"),
    ((*ASYNC, "algo.importance_correction=false"), "importance_correction must be true or null"),
    (("algo.behaviour_logprobs=engine",), "only applies at algo.max_staleness=1"),
])
def test_staleness_needs_an_explicit_off_policy_choice(extra, says):
    from kardia_rl.config import load_config
    from kardia_rl.errors import KardiaError

    with pytest.raises(KardiaError, match=re.escape(says)):
        load_config(os.path.join(ROOT, "conf", "tiny.yaml"), list(extra))
    load_config(os.path.join(ROOT, "conf", "tiny.yaml"), list(ASYNC))  # the complete choice is accepted


def test_mismatch_growth_alert_fires_once_against_the_first_steps():
    from kardia_rl.config import load_config
    from kardia_rl.monitoring import HackingMonitor

    mon = HackingMonitor(load_config(os.path.join(ROOT, "conf", "tiny.yaml"), []).monitor)  # window 3, x4
    fired = [mon.update(s, {"rollout/mismatch_kl": v}) for s, v in enumerate([0.01] * 3 + [0.02] * 3 + [0.06] * 4, 1)]
    codes = [[a.code for a in f] for f in fired]
    assert codes[:7] == [[]] * 7, "a doubling stays under the x4 bound"
    assert codes[7] == ["mismatch_growth"] and codes[8:] == [[], []], "fires when the rolling mean passes x4, once"
    quiet = HackingMonitor(load_config(os.path.join(ROOT, "conf", "tiny.yaml"), []).monitor)
    assert not any(quiet.update(s, {"rollout/mismatch_kl": v}) for s, v in
                   enumerate([1e-6] * 3 + [1e-4] * 3, 1)), "float32 noise under the floor is not growth"


def test_is_clip_frac_counts_the_tokens_whose_weight_the_cap_cut():
    import torch

    from kardia_rl.algo import policy_loss

    old = torch.zeros(1, 4)
    engine = torch.tensor([[0.0, -0.5, -1.0, -2.0]])  # weights exp(old - engine): 1, 1.65, 2.72, 7.39
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding: never counted
    _, m = policy_loss(old.clone(), old, torch.ones(1), mask, engine_logp=engine, is_cap=2.0)
    assert m["is_clip_frac"] == pytest.approx(1 / 3)
    _, m = policy_loss(old.clone(), old, torch.ones(1), mask)
    assert m["is_clip_frac"] == 0.0


def test_queue_records_the_prompts_drawn_ahead_and_a_resume_regenerates_them():
    """Without actors: at staleness 1 the checkpoint state names step t+1's prompts; a queue loaded from it
    starts step t+1 with exactly those and draws on from the restored stream."""
    from kardia_rl.trainer.one_step_off import RolloutQueue
    from kardia_rl.trainer.prompt_source import PromptSource

    samples = [SimpleNamespace(id=f"s{i}") for i in range(10)]

    def fake(step, batch, mark):
        mark()
        return SimpleNamespace(completions=[None] * len(batch), samples=batch, timing={})

    def queue(src):
        return RolloutQueue(1, src, samples, 5.0, fake, dict)

    src = PromptSource(samples, 2, seed=3)
    q = queue(src)
    trained = [[s.id for s in q.take(1, {}).samples]]
    q.submit_ahead(1, last_step=4)
    q.before_sync()
    state, stream = q.state_dict(), src.state_dict()
    assert state["step"] == 2 and len(state["ids"]) == 2
    src2 = PromptSource(samples, 2, seed=3)
    src2.load_state_dict(stream)
    q2 = queue(src2)
    q2.load_state_dict(state)
    for step in (2, 3, 4):
        trained.append([s.id for s in q2.take(step, {}).samples])
        q2.submit_ahead(step, last_step=4)
    ref = PromptSource(samples, 2, seed=3)
    assert trained == [[s.id for s in ref.next_batch()] for _ in range(4)], "no prompt skipped or repeated"


# --- Ray, vLLM, DeepSpeed ------------------------------------------------------------------------------------
def _stream(run_dir, model, n_steps, *extra):
    """The prompt ids the stream yields for steps 1..n_steps, as the run loads its samples."""
    from fault_runs import fault_overrides

    from kardia_rl.config import load_config
    from kardia_rl.trainer.prompt_source import PromptSource
    from kardia_rl.trainer.run import load_train_samples

    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), fault_overrides(run_dir, model, *extra))
    src = PromptSource(load_train_samples(cfg), cfg.algo.prompts_per_step, cfg.seed)
    return [",".join(str(s.id) for s in src.next_batch()) for _ in range(n_steps)]


def _assert_one_step_off(rows, stream):
    for s, m in rows.items():
        assert m["async/staleness_max"] <= 1 and m["async/policy_version_min"] in (s - 1, s - 2), (s, m)
    assert any(m["async/staleness_max"] == 1 for m in rows.values()), "generation overlapped some update"
    assert [rows[s]["rollout/prompt_ids"] for s in sorted(rows)] == stream, "every prompt exactly once, in order"


@pytest.mark.ray
@pytest.mark.slow
def test_queue_at_staleness_0_equals_the_loop_without_it(sft_model_dir, tmp_path):
    """8 steps through the queue at max_staleness=0 against 8 steps of the synchronous loop with no queue (the
    driver's generation called in the driver's own thread, the prompts drawn at the step's start): the same
    prompts, rewards, losses and metrics, and bit-identical final weights."""
    from fault_runs import fault_overrides

    from kardia_rl.config import load_config
    from kardia_rl.trainer.driver import NON_DETERMINISTIC_PREFIXES, GRPOTrainer
    from kardia_rl.trainer.run import load_train_samples

    class NoQueue(GRPOTrainer):
        def take_rollout(self, step, timing):
            rollout = self.start_rollout(step, self.prompts.next_batch(), lambda: None)
            rollout.policy_versions = [step - 1] * len(rollout.completions)
            rollout.reward_stats = self.reward.stats_summary()
            timing.update(rollout.timing, **{"timing/rollout_wait": 0.0})
            return rollout

    def run(cls, name):
        cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), fault_overrides(
            tmp_path / name, sft_model_dir, "rollout.num_actors=1", "algo.num_steps=8", "checkpoint.every=0",
            "model.max_new_tokens=160", "judge.judge_malformed=true"))  # every answer judged: rewards vary
        tr = cls(cfg, load_train_samples(cfg), cfg.model.path).setup()
        try:
            first = tr.learner.hf_state_dict()
            rows = [tr.step(s) for s in range(1, 9)]
            last = tr.learner.hf_state_dict()
            assert sum(not (first[k] == last[k]).all() for k in first) > len(first) // 2, "the updates changed weights"
            return rows, last
        finally:
            tr.shutdown()

    with local_ray():
        queued, w_queued = run(GRPOTrainer, "queued")
        plain, w_plain = run(NoQueue, "plain")
    for s, (a, b) in enumerate(zip(queued, plain), 1):
        keys = sorted(k for k in b if not k.startswith(NON_DETERMINISTIC_PREFIXES))
        assert "train/loss" in keys and "rollout/prompt_ids" in keys and "rollout/reward_mean" in keys
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, f"step {s}"
        assert a["async/staleness_max"] == 0.0
    assert len({r["rollout/prompt_ids"] for r in queued}) == 8
    assert any(r["rollout/reward_std"] > 0 for r in queued), "rewards vary, so the losses carry a signal"
    assert all((w_queued[k] == w_plain[k]).all() for k in w_plain), "identical weights after 8 steps"


@pytest.mark.ray
@pytest.mark.slow
def test_one_step_off_job_killed_with_9_resumes_every_prompt_once(sft_model_dir, tmp_path):
    run = tmp_path / "run"
    extra = (*ASYNC, "algo.num_steps=4")
    cmd, kw = kardia_train(run, sft_model_dir, *extra)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
        try:
            wait_for_step(run, 2, proc)
            while not (run / "checkpoints" / "step_000002").exists() and proc.poll() is None:
                time.sleep(0.1)  # step 2's checkpoint (holding step 3's drawn prompts) is published
        finally:
            kill_job(proc)
    assert steps(run)[-1] < 4, "killed mid-run"
    cmd, kw = kardia_train(run, sft_model_dir, *extra, "checkpoint.resume=true")
    done = subprocess.run(cmd, capture_output=True, timeout=900, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[resume] from " in done.stdout, done.stdout[-2000:]
    rows = metrics_by_step(run)
    assert sorted(rows) == [1, 2, 3, 4]
    _assert_one_step_off(rows, _stream(run, sft_model_dir, 4, *extra))


@pytest.mark.ray
@pytest.mark.slow
def test_rollout_actor_killed_during_overlapped_generation_fails_the_step_and_auto_resumes(sft_model_dir, tmp_path):
    """kill -9 of a rollout actor during step 3's generation, which overlaps step 2's update: step 2 fails at its
    wait before the sync, as soon as Ray reports the death (no in-place restart while the learner changes the
    weights); checkpoint.auto_resume restarts from step 1's checkpoint, which names step 2's drawn prompts."""
    from kardia_rl.cluster.rollout_group import FAULT_FILE_ENV

    fault = tmp_path / "faults"
    fault.write_text("generation 3 0\n")
    run = tmp_path / "run"
    extra = (*ASYNC, "checkpoint.auto_resume=1")
    t0 = time.perf_counter()
    out = train_in_process(run, sft_model_dir, *extra, env={FAULT_FILE_ENV: str(fault)})
    assert out["auto_resumes"] == 1 and fault.read_text() == "", "the fault fired once and cost one resume"
    rows = metrics_by_step(run)
    assert sorted(rows) == [1, 2, 3]
    _assert_one_step_off(rows, _stream(run, sft_model_dir, 3, *extra))
    print(f"[one-step-off] run with a killed rollout actor: {time.perf_counter() - t0:.0f}s")
