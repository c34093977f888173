"""Cross-field validation: the one place where rules that involve several keys are checked.

Each rule yields a message naming the keys and values involved; all failures are reported together.
"""
from __future__ import annotations

import os
from dataclasses import fields, is_dataclass

from kardia_rl.config.schema import RUBRIC_DIMENSIONS, KardiaConfig
from kardia_rl.errors import ConfigError


def _choice_keys(obj, prefix: str = ""):
    """(dotted key, allowed values) of every config field declared with `choices` in schema.py."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from _choice_keys(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["choices"]


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def config_problems(cfg: KardiaConfig) -> list[str]:
    p: list[str] = []
    for key, choices in _choice_keys(cfg):
        v = _get(cfg, key)
        if v not in choices:
            p.append(f"{key}: {v!r} is not one of {list(choices)}")
    positive_ints = ["algo.group_size", "algo.prompts_per_step", "algo.num_steps", "algo.updates_per_step",
                     "rollout.num_actors", "judge.num_actors", "judge.max_in_flight", "judge.pool_max_attempts",
                     "learner.num_workers",
                     "learner.micro_batch_size", "sft.batch_size", "sft.micro_batch_size", "sft.max_seq_len",
                     "model.max_prompt_tokens", "model.max_new_tokens", "split.k", "logging.log_every"]
    for key in positive_ints:
        if _get(cfg, key) < 1:
            p.append(f"{key}: must be >= 1, got {_get(cfg, key)}")
    for key in ("rollout.temperature", "split.temperature", "eval.temperature", "learner.lr", "sft.lr",
                "judge.timeout_s", "rollout.sync_check_threshold", "rollout.sync_check_mean_low_precision",
                "rollout.sync_bucket_mb", "rollout.sync_timeout_s", "rollout.actor_timeout_s"):
        if not _get(cfg, key) > 0:
            p.append(f"{key}: must be > 0, got {_get(cfg, key)}")
    if cfg.rollout.verify_every < 0:
        p.append(f"rollout.verify_every: must be >= 0, got {cfg.rollout.verify_every}")
    for key in ("judge.max_retries", "judge.backoff_s"):
        if _get(cfg, key) < 0:
            p.append(f"{key}: must be >= 0, got {_get(cfg, key)}")
    if cfg.rollout.max_restarts_per_step < 0:
        p.append(f"rollout.max_restarts_per_step: must be >= 0, got {cfg.rollout.max_restarts_per_step}")
    if cfg.rollout.weight_sync == "collective" and cfg.rollout.engine == "hf":
        p.append("rollout.weight_sync: collective needs rollout.engine=vllm (the transformers engine cannot join "
                 "the weight-transfer group); use auto or object_store")
    if cfg.rollout.top_p != 1:
        # The learner (ratio, KL, importance weights) scores tokens under the full softmax(logits / T); with
        # top_p < 1 the sampler draws from a renormalised nucleus, so every log-prob would refer to another
        # distribution than the one sampled.
        p.append(f"rollout.top_p: must be 1 for GRPO, got {cfg.rollout.top_p}: the learner's log-probs use the full "
                 "softmax(logits / rollout.temperature); lower rollout.temperature to sample more narrowly")
    w = {k: _get(cfg, f"reward.{k}_weight") for k in ("format", "emotion", "rubric")}
    for k, v in w.items():
        if v < 0:
            p.append(f"reward.{k}_weight: must be >= 0, got {v}")
    if all(v == 0 for v in w.values()):
        p.append("reward: format_weight, emotion_weight and rubric_weight are all 0; nothing to learn from")
    dims = cfg.judge.dimension_weights
    unknown = sorted(set(dims) - set(RUBRIC_DIMENSIONS))
    if unknown:
        p.append(f"judge.dimension_weights: unknown dimension(s) {unknown}; known: {list(RUBRIC_DIMENSIONS)}")
    if any((not isinstance(v, (int, float))) or v < 0 for v in dims.values()):
        p.append(f"judge.dimension_weights: weights must be numbers >= 0, got {dims}")
    elif dims and sum(dims.values()) <= 0:
        p.append("judge.dimension_weights: all weights are 0")
    rollout_batch = cfg.algo.prompts_per_step * cfg.algo.group_size
    per_pass = cfg.learner.micro_batch_size * cfg.learner.num_workers
    if rollout_batch % per_pass:
        p.append(f"algo.prompts_per_step * algo.group_size = {cfg.algo.prompts_per_step} * {cfg.algo.group_size} = "
                 f"{rollout_batch} is not divisible by learner.micro_batch_size * learner.num_workers = "
                 f"{cfg.learner.micro_batch_size} * {cfg.learner.num_workers} = {per_pass}")
    if cfg.sft.batch_size % cfg.sft.micro_batch_size:
        p.append(f"sft.batch_size ({cfg.sft.batch_size}) must be a multiple of sft.micro_batch_size "
                 f"({cfg.sft.micro_batch_size})")
    if cfg.algo.group_size < 2 and cfg.algo.advantage != "batch_std":
        p.append(f"algo.group_size = {cfg.algo.group_size}: group-normalised advantages need at least 2 candidates")
    if not 0 <= cfg.algo.clip_eps < 1 or cfg.algo.clip_eps_high < 0:
        p.append(f"algo.clip_eps ({cfg.algo.clip_eps}) must be in [0,1) and clip_eps_high ({cfg.algo.clip_eps_high}) >= 0")
    ac = cfg.algo
    if (ac.advantage == "drgrpo") != (ac.loss_agg == "seq_mean_token_sum_norm"):
        p.append(f"algo.advantage={ac.advantage!r} with algo.loss_agg={ac.loss_agg!r} is half of Dr. GRPO (it "
                 "needs both the mean-only advantage and the constant normaliser seq_mean_token_sum_norm); "
                 "use algo.preset=drgrpo, or change both keys")
    if not ac.adv_eps > 0:
        p.append(f"algo.adv_eps: must be > 0 (a tied group would divide 0 by 0), got {ac.adv_eps}")
    if not 0 < ac.overlong_buffer <= 1:
        p.append(f"algo.overlong_buffer: must be in (0, 1] (a fraction of model.max_new_tokens), got {ac.overlong_buffer}")
    if ac.overlong_penalty < 0:
        p.append(f"algo.overlong_penalty: must be >= 0, got {ac.overlong_penalty}")
    if ac.max_staleness not in (0, 1):
        p.append(f"algo.max_staleness: must be 0 (synchronous) or 1 (one-step-off), got {ac.max_staleness}")
    elif ac.max_staleness == 1 and not ac.behaviour_logprobs:
        p.append("algo.max_staleness=1 needs algo.behaviour_logprobs: recompute (the learner's log-probs with the "
                 "truncated IS weight against the engine's) or engine (the engine's log-probs as the old policy)")
    elif ac.max_staleness == 1 and ac.behaviour_logprobs == "recompute" and ac.importance_correction is False:
        p.append("algo.behaviour_logprobs=recompute at algo.max_staleness=1 corrects the staleness with the truncated "
                 "IS weight: algo.importance_correction must be true or null, got false")
    elif ac.max_staleness == 0 and ac.behaviour_logprobs:
        p.append(f"algo.behaviour_logprobs={ac.behaviour_logprobs!r} only applies at algo.max_staleness=1 (at 0 every "
                 "sample is on-policy): leave it empty")
    if cfg.algo.kl_beta < 0:
        p.append(f"algo.kl_beta: must be >= 0, got {cfg.algo.kl_beta}")
    if cfg.learner.zero_stage not in (0, 1, 2, 3):
        p.append(f"learner.zero_stage: must be 0-3, got {cfg.learner.zero_stage}")
    if not 0 <= cfg.split.tau <= 1:
        p.append(f"split.tau: must be in [0, 1], got {cfg.split.tau}")
    if cfg.split.reference == "warmup" and cfg.split.folds < 2:  # K=1 would rate the turns it trained on
        p.append(f"split.folds: must be >= 2 with split.reference=warmup (each warm-up rates only a held-out fold), "
                 f"got {cfg.split.folds}")
    if cfg.split.reference == "warmup" and not cfg.split.warmup_epochs > 0:
        p.append(f"split.warmup_epochs: must be > 0 with split.reference=warmup, got {cfg.split.warmup_epochs}")
    if not (0 <= cfg.data.val_fraction < 1 and 0 <= cfg.data.test_fraction < 1
            and cfg.data.val_fraction + cfg.data.test_fraction < 1):
        p.append(f"data.val_fraction ({cfg.data.val_fraction}) + data.test_fraction ({cfg.data.test_fraction}) "
                 "must each be in [0,1) and sum below 1")
    if cfg.data.system_template and ("{person}" not in cfg.data.system_template):
        p.append("data.system_template: must contain {person} (the user's profile)")
    for key in ("rollout.kv_cache_bytes", "judge.kv_cache_memory_bytes"):  # 0 = automatic (see the key's doc)
        if _get(cfg, key) < 0:
            p.append(f"{key}: must be >= 0 (0 = sized automatically), got {_get(cfg, key)}")
    if cfg.checkpoint.keep_last < 1:
        p.append(f"checkpoint.keep_last: must be >= 1, got {cfg.checkpoint.keep_last}")
    if cfg.checkpoint.auto_resume < 0:
        p.append(f"checkpoint.auto_resume: must be >= 0, got {cfg.checkpoint.auto_resume}")
    if cfg.algo.val_every < 0:
        p.append(f"algo.val_every: must be >= 0 (0 = no validation during GRPO), got {cfg.algo.val_every}")
    if cfg.algo.val_samples < 1:
        p.append(f"algo.val_samples: must be >= 1, got {cfg.algo.val_samples}")
    if cfg.algo.val_every > 0 and cfg.data.val_fraction <= 0:  # validation prompts come from that split
        p.append(f"algo.val_every={cfg.algo.val_every} needs a validation split: data.val_fraction must be > 0, got "
                 f"{cfg.data.val_fraction} (or set algo.val_every=0)")
    if cfg.checkpoint.keep_best and cfg.algo.val_every <= 0:  # the best is chosen by the validation reward
        p.append("checkpoint.keep_best=true needs validation during GRPO: set algo.val_every > 0 (or "
                 "checkpoint.keep_best=false)")
    if cfg.model.lora.span_rows_lr_scale <= 0:
        p.append(f"model.lora.span_rows_lr_scale: must be > 0, got {cfg.model.lora.span_rows_lr_scale}")
    if cfg.model.lora.enabled and cfg.model.lora.r < 1:
        p.append(f"model.lora.r: must be >= 1, got {cfg.model.lora.r}")
    if cfg.judge.calibration and cfg.judge.backend != "embedding":
        p.append(f"judge.calibration: a head calibrates the embedding judge only, got judge.backend={cfg.judge.backend}; "
                 "set judge.calibration='' or judge.backend=embedding")
    elif cfg.judge.calibration and not os.path.isfile(cfg.judge.calibration):
        p.append(f"judge.calibration: {cfg.judge.calibration}: no such head file (write one with `kardia-rl "
                 "judge-calibrate`)")
    p.extend(_synth_problems(cfg))
    return p


def _synth_problems(cfg: KardiaConfig) -> list[str]:
    """`synth.*`: counts, and an endpoint for every role that goes to one."""
    p, sy = [], cfg.synth
    for key in ("num_engines", "max_exchanges", "max_concurrent_dialogues", "user_max_tokens", "evaluator_max_tokens",
                "shard_size"):
        if getattr(sy, key) < 1:
            p.append(f"synth.{key}: must be >= 1, got {getattr(sy, key)}")
    for key in ("max_revisions", "evaluator_retries", "max_dialogues", "responder_max_tokens"):
        if getattr(sy, key) < 0:
            p.append(f"synth.{key}: must be >= 0, got {getattr(sy, key)}")
    for key in ("user_temperature", "responder_temperature", "evaluator_temperature"):
        if getattr(sy, key) < 0:
            p.append(f"synth.{key}: must be >= 0 (0 = greedy), got {getattr(sy, key)}")
    if not 0 < sy.near_dup_threshold <= 1:
        p.append(f"synth.near_dup_threshold: must be in (0, 1], got {sy.near_dup_threshold}")
    if sy.max_emotion_jump not in (0, 1, 2):
        p.append(f"synth.max_emotion_jump: must be 0, 1 or 2, got {sy.max_emotion_jump}")
    if not 1 <= sy.min_user_safety <= 5:
        p.append(f"synth.min_user_safety: must be in [1, 5] (the judge's safety scale), got {sy.min_user_safety}")
    if sy.identity_age_tolerance < 0:
        p.append(f"synth.identity_age_tolerance: must be >= 0, got {sy.identity_age_tolerance}")
    for role in ("user", "responder", "evaluator"):
        url = getattr(sy, f"{role}_base_url")
        if getattr(sy, f"{role}_backend") == "openai" and not url.startswith(("http://", "https://")):
            p.append(f"synth.{role}_base_url: {url!r} must be an http(s) URL with synth.{role}_backend=openai")
    if sy.evaluator_backend == "judge" and cfg.judge.backend == "embedding":
        p.append("synth.evaluator_backend=judge needs an LLM judge (judge.backend vllm | hf | openai), got "
                 "judge.backend=embedding; or set synth.evaluator_backend to engine or openai")
    return p


def validate_config(cfg: KardiaConfig) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
