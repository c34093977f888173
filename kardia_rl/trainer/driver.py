"""The GRPO driver: a thin single controller over the rollout group, judge pool and learner group.

Each step reads as a list (see `GRPOTrainer.step`): sample prompts -> generate N and score each candidate
as soon as it is generated -> group-normalised advantages -> learner update -> weight sync (verified) ->
validation on held-out prompts every algo.val_every steps (trainer.validation) -> log -> checkpoint. All heavy
work happens in the actors; the driver only moves token ids and numbers.

Rollouts go through a queue (trainer/one_step_off.py). At algo.max_staleness=0 it is the sequence above. At 1,
step t+1's generation and judging start before step t's update and the weight sync after update t waits until
that generation has finished, so the learner trains on samples one update old. Which old log-probs the loss uses
then is algo.behaviour_logprobs:
- recompute (verl's and AReaL's decoupled PPO): the ratio's denominator is the learner's own log-prob on the
  weights before this update (the pass's detached forward, no extra pass), so PPO's clip bounds the update as in
  the synchronous loop; the truncated IS weight min(pi_old / pi_engine, algo.is_cap), on whatever
  algo.importance_correction says when null, corrects from the behaviour policy (the engine, one update older,
  plus its kernel mismatch) to it; rollout/mismatch_kl then measures the two together.
- engine (slime's use_rollout_logprobs): the engine's sampling log-probs are the denominator, so the clip bounds the
  step from the behaviour policy itself (one update plus the mismatch), and the IS weight is 1.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Optional, Sequence

import torch

from kardia_rl.algo import apply_kl_to_rewards, group_advantages, overlong_keep, overlong_penalty
from kardia_rl.cluster.checkpoint import CheckpointManager, capture_rng, restore_rng
from kardia_rl.cluster.judge_pool import JudgePool
from kardia_rl.cluster.learner_group import LearnerGroup
from kardia_rl.cluster.preemption import Abandoned, Preempted, StopSignal
from kardia_rl.cluster.ray_cluster import init_ray
from kardia_rl.cluster.rollout import generate_and_score
from kardia_rl.cluster.rollout_group import RolloutGroup
from kardia_rl.cluster.weight_sync import WeightSync
from kardia_rl.config import RUBRIC_DIMENSIONS
from kardia_rl.config.specs import LossSpec
from kardia_rl.data.encoding import encode_prompt, encode_target
from kardia_rl.errors import KardiaError
from kardia_rl.format.spans import SPAN_TOKENS
from kardia_rl.learner.batching import collate_rollout
from kardia_rl.monitoring import HackingMonitor, MetricsLogger, batch_sample_rows, rollout_metrics
from kardia_rl.monitoring.stats import LENGTH_FINISH
from kardia_rl.rewards.judge.identity import write_judge_identity
from kardia_rl.rewards.unified import UnifiedReward, summary
from kardia_rl.trainer.one_step_off import RolloutQueue
from kardia_rl.trainer.prompt_source import PromptSource
from kardia_rl.trainer.validation import Validation

NON_DETERMINISTIC_PREFIXES = ("timing/", "perf/", "judge/latency", "async/queue_wait")  # wall-clock numbers
# Rollout durations that ran beside the driver's phases (at staleness 1): reported, not summed into timing/other
OVERLAPPED = ("timing/generation", "timing/judge", "timing/judge_exposed")


class GRPOTrainer:
    def __init__(self, cfg, samples: Sequence, policy_path: str):
        if not samples:
            raise KardiaError("GRPO needs at least one training prompt (the hard split is empty?)")
        self.cfg, self.samples, self.policy_path = cfg, list(samples), policy_path
        self.loss = LossSpec.from_config(cfg)  # the objective, as the learner reads it
        self.start_step = 1
        self.stop, self.abandoned = None, False  # the SIGTERM handler (train) and whether it abandoned a step

    # --- set-up -----------------------------------------------------------------------------------------
    def setup(self) -> "GRPOTrainer":
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(self.policy_path)
        missing = [t for t in SPAN_TOKENS if t not in self.tokenizer.get_vocab()]
        if missing:
            raise KardiaError(f"model.path {self.policy_path!r} has no span tokens ({missing[0]} ...): GRPO starts from a "
                              f"checkpoint that knows the format; run `kardia-rl sft` (or the pipeline) first")
        self.dims = RUBRIC_DIMENSIONS
        init_ray(cfg.ray.address, cfg.ray.num_cpus, log_level=cfg.logging.engine_log_level)
        cpus = cfg.ray.cpus_per_actor
        self.prompt_ids = {s.id: encode_prompt(s, self.tokenizer, cfg) for s in self.samples}
        first = self.samples[0]
        # A fixed probe (a real prompt and its reference answer) for verifying every weight sync.
        self.probe = (self.prompt_ids[first.id] + encode_target(first, self.tokenizer))[-256:]
        self.learner = LearnerGroup(cfg, self.policy_path, cpus)
        self.rollout = RolloutGroup(cfg, self.policy_path, cpus)
        self.weight_sync = WeightSync(cfg, self.learner, self.rollout, self.probe)
        # Which judge scores this run (run_dir/judge.json, the run's result); a bad judge.calibration head stops
        # here with one line, before any judge actor starts.
        self.judge_identity = write_judge_identity(cfg)
        self.judge = JudgePool(cfg, cpus)
        self.reward = UnifiedReward.from_config(cfg, self.judge)
        self.prompts = PromptSource(self.samples, cfg.algo.prompts_per_step, cfg.seed)
        self.queue = RolloutQueue(cfg.algo.max_staleness, self.prompts, self.samples, cfg.rollout.actor_timeout_s,
                                  self.start_rollout, self.reward.stats_summary)
        self.monitor = HackingMonitor(cfg.monitor)
        self.ckpt = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep_last)
        self.ckpt.remove_leftovers()  # .tmp-* of a save that a kill interrupted (nothing of this run is saving yet)
        latest = self.ckpt.latest() if cfg.checkpoint.resume else None
        self.logger = MetricsLogger(cfg.run_dir, cfg, resume=latest is not None)
        self.validation = Validation(cfg, self.tokenizer, self.rollout, self.judge, self.learner,
                                     recover=self.replace_rollout_actor, resumed=latest is not None)
        if latest:
            self._resume(latest)
        return self

    def _resume(self, path: str) -> None:
        state = self.ckpt.load_driver_state(path)
        self.learner.load_checkpoint(os.path.join(path, "learner"))
        self.prompts.load_state_dict(state["prompts"])
        self.queue.load_state_dict(state.get("pending"))  # prompts drawn for the next step, not yet trained
        self.monitor.load_state_dict(state["monitor"])
        restore_rng(state["rng"])
        self.logger.truncate_after(state["step"])
        self.start_step = state["step"] + 1
        m = self.sync_weights(state["step"])  # the engines restarted from the base weights: bring them up to date
        print(f"[resume] from {path} at step {state['step']}; engines re-synced "
              f"(max diff {m.get('rollout/sync_logprob_diff', float('nan')):.2e})")

    # --- the loop ---------------------------------------------------------------------------------------
    def train(self) -> dict:
        last = {}
        # SIGTERM (preemption, `ray job stop`): during generation and judging the step is abandoned and the learner's
        # state (the last completed step) is checkpointed at once; later in a step, at its end (cluster/preemption.py)
        with StopSignal() as stop:
            self.stop = stop
            for step in range(self.start_step, self.cfg.algo.num_steps + 1):
                boundary = self.driver_state()  # the last completed step's: what an abandoned step checkpoints
                try:
                    last = self.step(step)
                except Abandoned:
                    self.abandoned = True
                    raise Preempted(step - 1, self.save_now(step - 1, boundary), self.cfg.run_dir) from None
                if stop.requested and step < self.cfg.algo.num_steps:
                    raise Preempted(step, self.ckpt.latest(), self.cfg.run_dir)
        return last

    def step(self, step: int) -> dict:
        t0, timing = time.perf_counter(), {}
        rollout = self.take_rollout(step, timing)                                    # 1-3. prompts, generate N, score
        self.queue.submit_ahead(step, self.cfg.algo.num_steps)                       # 3b. staleness 1: step+1's starts
        with _timed(timing, "timing/advantages"):
            batch, adv = self.build_batch(rollout)                                   # 4. group advantages
        with _timed(timing, "timing/train"):
            train_metrics = self.update(batch)                                       # 5. learner update
        timing["timing/generation_wait"] = self.queue.before_sync()                  # 6a. never sync mid-batch
        with _timed(timing, "timing/weight_sync"):
            sync = self.sync_weights(step)                                           # 6. weight sync, verified
        val = self.validate(step, timing)                                            # 6b. held-out validation, every K
        metrics = self.metrics(rollout, adv, train_metrics, sync, step) | val        # 7. log
        self.log(step, metrics, rollout, adv, timing, t0)
        with _timed(timing, "timing/checkpoint"):
            self.maybe_checkpoint(step)                                              # 8. checkpoint
        return metrics

    # --- the steps ----------------------------------------------------------------------------------------
    def take_rollout(self, step: int, timing: dict):
        """Step `step`'s scored rollout from the queue (started now, or during the previous step's update)."""
        with self.stop.abandonable() if self.stop else contextlib.nullcontext():  # SIGTERM abandons this wait
            rollout = self.queue.take(step, timing)
        timing.update(rollout.timing)
        return rollout

    def start_rollout(self, step: int, samples, on_generated):
        """Generate N per prompt and score them (the queue's thread runs this). In-place rollout actor restarts
        only at staleness 0: at 1 the learner is mid-update, so a replacement could not be given the weights this
        generation runs on; the step fails instead (trainer/one_step_off.py)."""
        self.reward.reset_stats()
        self.rollout.begin_step(step)
        sync = self.cfg.algo.max_staleness == 0
        return generate_and_score(self.rollout, self.reward, samples, [self.prompt_ids[s.id] for s in samples],
                                  n=self.cfg.algo.group_size, seed=self.cfg.seed, step=step,
                                  recover=self.replace_rollout_actor if sync else None,
                                  max_restarts=self.cfg.rollout.max_restarts_per_step if sync else 0,
                                  on_generated=on_generated)

    def replace_rollout_actor(self, index: int, error: BaseException) -> None:
        """A rollout actor died mid-step: a new one in its place, loaded with the current weights and verified
        (WeightSync.rejoin); the caller sends its chunk again."""
        self.rollout.restart(index, error, reload=self.weight_sync.rejoin)

    def build_batch(self, rollout):
        ac, n = self.cfg.algo, rollout.group_size
        prompts = [p for p in rollout.prompt_ids for _ in range(n)]
        responses = [c.token_ids for c in rollout.completions]
        batch = collate_rollout(prompts, responses, self.tokenizer.pad_token_id,
                                engine_logprobs=[c.logprobs for c in rollout.completions])
        rewards = torch.tensor([r.total for r in rollout.rewards], dtype=torch.float32)
        truncated, penalty = self.overlong(rollout)
        if penalty is not None:  # DAPO's soft overlong penalty is part of the reward the group is ranked on
            rewards = rewards + penalty
        if self.loss.kl_in_reward:
            logp = self.learner.compute_logprobs(batch, "policy")
            ref = self.learner.compute_logprobs(batch, "ref")
            rewards = apply_kl_to_rewards(rewards, logp, ref, batch["response_mask"], self.loss.kl_beta,
                                          self.loss.kl_estimator)
            # Handed on, so the learner logs its KL from these instead of running the reference again, and
            # the pre-update policy is not run twice either (same weights, same numbers).
            batch["ref_logprobs"] = ref
            if ac.updates_per_step > 1:
                batch["old_logprobs"] = logp
        adv = group_advantages(rewards, n, mode=ac.advantage, eps=ac.adv_eps, drop_zero_std=ac.drop_zero_std)
        batch["advantages"], batch["keep"] = adv.advantages, adv.keep & overlong_keep(truncated, ac.overlong)
        if ac.max_staleness > 0 and ac.behaviour_logprobs == "engine":  # the behaviour policy's own log-probs
            batch["old_logprobs"] = batch["engine_logprobs"]
        if ac.updates_per_step > 1 and "old_logprobs" not in batch:  # ratio denominator for several passes
            batch["old_logprobs"] = self.learner.compute_logprobs(batch, "policy")
        return batch, adv

    def overlong(self, rollout):
        """Per candidate: cut at model.max_new_tokens? And with algo.overlong=penalty, its reward penalty."""
        ac, max_len = self.cfg.algo, self.cfg.model.max_new_tokens
        truncated = [c.finish_reason == LENGTH_FINISH for c in rollout.completions]
        if ac.overlong != "penalty":
            return truncated, None
        return truncated, overlong_penalty([len(c.token_ids) for c in rollout.completions], max_len,
                                           max(1, round(max_len * ac.overlong_buffer)), ac.overlong_penalty)

    def update(self, batch: dict) -> dict:
        out: dict = {}
        for _ in range(self.cfg.algo.updates_per_step):
            out = self.learner.train_step(batch)
        return out

    def sync_weights(self, step: int) -> dict:
        """Learner -> every engine (collective, bucketed; see cluster.weight_sync), verified against the
        learner's own forward when due; a rollout actor that dies meanwhile is replaced and the sync run again
        (RolloutGroup.survive); raises KardiaError on a failed check or a timeout."""
        out = self.rollout.survive(lambda: self.weight_sync.sync(version=str(step)), self.weight_sync.rejoin)
        self.queue.engine_version = step  # what the next generation records as its samples' policy version
        return out

    def validate(self, step: int, timing: dict) -> dict:
        if self.validation.due(step):
            self.queue.drain()  # step+1's judging shares the judge pool: let it finish first
        return self.validation.maybe_run(step, timing)

    def metrics(self, rollout, adv, train_metrics: dict, sync: dict, step: int = 1) -> dict:
        lengths = [len(c.token_ids) for c in rollout.completions]
        m = rollout_metrics(rollout.rewards, rollout.group_size, lengths,
                            [c.finish_reason for c in rollout.completions], dimensions=self.dims)
        m.update(summary(rollout.rewards))
        m.update(rollout.reward_stats)
        if rollout.policy_versions:  # recorded by the queue (a hand-built Rollout has none)
            stale = [step - 1 - v for v in rollout.policy_versions]  # updates between its weights and the learner's
            m["async/staleness_mean"], m["async/staleness_max"] = sum(stale) / len(stale), float(max(stale))
            m["async/policy_version_min"] = float(min(rollout.policy_versions))
            m["rollout/prompt_ids"] = ",".join(str(s.id) for s in rollout.samples)  # what this step trained on
        m["judge/actor_failures"] = float(self.judge.actor_failures)
        m["rollout/actor_restarts"] = float(self.rollout.step_restarts)  # generation, judging, sync, verification
        m.update(self.judge.step_counters())
        m.update({f"rollout/{k}": v for k, v in adv.stats().items()})
        m.update(train_metrics)  # incl. rollout/logprob_diff_{mean,max}, rollout/mismatch_kl (engine vs learner)
        m.update(sync)  # rollout/sync_logprob_diff{,_mean} on verified syncs
        m["rollout/generated_tokens"] = float(sum(lengths))
        truncated, penalty = self.overlong(rollout)
        m["rollout/truncated"] = float(sum(truncated))  # a count: under overlong=filter, answers without loss
        if penalty is not None:
            m["rollout/overlong_penalty_mean"] = float(penalty.mean())
        return m

    def log(self, step: int, metrics: dict, rollout, adv, timing: dict, t0: float) -> None:
        t1 = time.perf_counter()
        timing["timing/step"] = t1 - t0
        timing["timing/other"] = timing["timing/step"] - sum(v for k, v in timing.items()
                                                             if k != "timing/step" and k not in OVERLAPPED)
        metrics["async/queue_wait_s"] = timing["timing/rollout_wait"] + timing["timing/generation_wait"]
        timing["timing/rollout_idle"] = self.queue.rollout_idle(t0, t1)  # no training generation running
        timing["timing/learner_idle"] = timing["timing/step"] - sum(   # learner neither updating nor syncing
            timing.get(k, 0.0) for k in ("timing/advantages", "timing/train", "timing/weight_sync"))
        metrics.update(timing)
        metrics["perf/tokens_per_sec"] = metrics["rollout/generated_tokens"] / max(timing["timing/step"], 1e-9)
        rows = None
        if self.logger.is_logging_step(step):
            rows = batch_sample_rows(
                step, [self.tokenizer.decode(p) for p in rollout.prompt_ids], [c.text for c in rollout.completions],
                rollout.rewards, adv.advantages.tolist(), rollout.group_size, self.cfg.logging.samples_per_table,
                [s.emotion for s in rollout.samples], self.cfg.data.span_notation)
        self.logger.log(step, metrics, alerts=self.monitor.update(step, metrics), samples=rows)

    def maybe_checkpoint(self, step: int) -> Optional[str]:
        every, last = self.cfg.checkpoint.every, self.cfg.algo.num_steps
        stopping = self.stop is not None and self.stop.requested
        if not (step == last or stopping or (every > 0 and step % every == 0)):
            return None
        self.rollout.fault_point("checkpoint")  # tests only: a rollout actor dying now is replaced next step
        return self.ckpt.save(step, self.driver_state(), self.learner.save_checkpoint)

    def driver_state(self) -> dict:
        """Everything of the run outside the learner, as a checkpoint holds it."""
        return {"prompts": self.prompts.state_dict(), "monitor": self.monitor.state_dict(), "rng": capture_rng(),
                "pending": self.queue.state_dict()}

    def save_now(self, step: int, state: dict) -> Optional[str]:
        """SIGTERM abandoned step + 1: checkpoint `step` from the learner (which still holds it) and `state`."""
        if step < 1:
            return None  # nothing learned yet
        if os.path.isdir(self.ckpt.path(step)):
            return self.ckpt.path(step)  # written at the end of that step already (published only when complete)
        t0 = time.perf_counter()
        path = self.ckpt.save(step, state, self.learner.save_checkpoint)
        print(f"[signal] checkpoint of step {step} written in {time.perf_counter() - t0:.2f}s: {path}", flush=True)
        return path

    # --- end ------------------------------------------------------------------------------------------
    def export(self, out_dir: str) -> str:
        """The final policy as a save_pretrained folder (loads as-is in transformers and vLLM)."""
        return self.learner.save_pretrained(out_dir)

    def shutdown(self) -> None:
        if hasattr(self, "rollout"):  # after SIGTERM, engines still generating are killed, not waited for
            self.rollout.shutdown(graceful=not self.abandoned)
        for part in ("judge", "learner"):
            if hasattr(self, part):
                getattr(self, part).shutdown()
        if hasattr(self, "logger"):
            self.logger.close()


@contextlib.contextmanager
def _timed(into: dict, key: str):
    """Seconds spent in the block, stored as `into[key]` (also when the block raises)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        into[key] = time.perf_counter() - t
