"""Validation: each key's own choices and bounds, declared beside the key in schema.py (`doc(..., choices)`,
`doc(..., ge=, gt=, le=, lt=)`) and checked here; and the cross-field rules, the one place where rules that
involve several keys are checked.

Each problem is a message naming the keys and values involved; all failures are reported together.
"""
from __future__ import annotations

import operator
import os
from dataclasses import fields, is_dataclass

from kardia_rl.config.schema import RUBRIC_DIMENSIONS, KardiaConfig
from kardia_rl.errors import ConfigError


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _declared(obj, prefix: str = ""):
    """(dotted key, value, field metadata) of every leaf config field."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from _declared(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f.metadata


def bound_problem(key: str, value, bounds: dict):
    """The message for `value` outside `bounds` ({"ge": 0, "lt": 1} reads "in [0, 1)"), or None."""
    if value is None or all(_BOUNDS[name][1](value, b) for name, b in bounds.items()):
        return None
    low = [n for n in ("ge", "gt") if n in bounds]
    high = [n for n in ("le", "lt") if n in bounds]
    if low and high:
        want = (f"in {'[' if low[0] == 'ge' else '('}{bounds[low[0]]}, {bounds[high[0]]}"
                f"{']' if high[0] == 'le' else ')'}")
    else:
        name = (low or high)[0]
        want = f"{_BOUNDS[name][0]} {bounds[name]}"
    return f"{key}: must be {want}, got {value}"


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def config_problems(cfg: KardiaConfig) -> list[str]:
    p: list[str] = []
    for key, v, meta in _declared(cfg):
        if "choices" in meta and v not in meta["choices"]:
            p.append(f"{key}: {v!r} is not one of {list(meta['choices'])}")
        elif "bounds" in meta and (problem := bound_problem(key, v, meta["bounds"])):
            p.append(problem)
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
    if per_pass > 0 and rollout_batch % per_pass:  # (a zero batch size is out of its bounds above)
        p.append(f"algo.prompts_per_step * algo.group_size = {cfg.algo.prompts_per_step} * {cfg.algo.group_size} = "
                 f"{rollout_batch} is not divisible by learner.micro_batch_size * learner.num_workers = "
                 f"{cfg.learner.micro_batch_size} * {cfg.learner.num_workers} = {per_pass}")
    if cfg.sft.micro_batch_size > 0 and cfg.sft.batch_size % cfg.sft.micro_batch_size:
        p.append(f"sft.batch_size ({cfg.sft.batch_size}) must be a multiple of sft.micro_batch_size "
                 f"({cfg.sft.micro_batch_size})")
    if cfg.algo.group_size < 2 and cfg.algo.advantage != "batch_std":
        p.append(f"algo.group_size = {cfg.algo.group_size}: group-normalised advantages need at least 2 candidates")
    ac = cfg.algo
    if (ac.advantage == "drgrpo") != (ac.loss_agg == "seq_mean_token_sum_norm"):
        p.append(f"algo.advantage={ac.advantage!r} with algo.loss_agg={ac.loss_agg!r} is half of Dr. GRPO (it "
                 "needs both the mean-only advantage and the constant normaliser seq_mean_token_sum_norm); "
                 "use algo.preset=drgrpo, or change both keys")
    if ac.max_staleness == 1 and not ac.behaviour_logprobs:
        p.append("algo.max_staleness=1 needs algo.behaviour_logprobs: recompute (the learner's log-probs with the "
                 "truncated IS weight against the engine's) or engine (the engine's log-probs as the old policy)")
    elif ac.max_staleness == 1 and ac.behaviour_logprobs == "recompute" and ac.importance_correction is False:
        p.append("algo.behaviour_logprobs=recompute at algo.max_staleness=1 corrects the staleness with the truncated "
                 "IS weight: algo.importance_correction must be true or null, got false")
    elif ac.max_staleness == 0 and ac.behaviour_logprobs:
        p.append(f"algo.behaviour_logprobs={ac.behaviour_logprobs!r} only applies at algo.max_staleness=1 (at 0 every "
                 "sample is on-policy): leave it empty")
    if cfg.split.reference == "warmup" and cfg.split.folds < 2:  # K=1 would rate the turns it trained on
        p.append(f"split.folds: must be >= 2 with split.reference=warmup (each warm-up rates only a held-out fold), "
                 f"got {cfg.split.folds}")
    if cfg.split.reference == "warmup" and not cfg.split.warmup_epochs > 0:
        p.append(f"split.warmup_epochs: must be > 0 with split.reference=warmup, got {cfg.split.warmup_epochs}")
    if not cfg.data.val_fraction + cfg.data.test_fraction < 1:
        p.append(f"data.val_fraction ({cfg.data.val_fraction}) + data.test_fraction ({cfg.data.test_fraction}) "
                 "must sum below 1")
    if cfg.data.system_template and ("{person}" not in cfg.data.system_template):
        p.append("data.system_template: must contain {person} (the user's profile)")
    if cfg.algo.val_every > 0 and cfg.data.val_fraction <= 0:  # validation prompts come from that split
        p.append(f"algo.val_every={cfg.algo.val_every} needs a validation split: data.val_fraction must be > 0, got "
                 f"{cfg.data.val_fraction} (or set algo.val_every=0)")
    if cfg.checkpoint.keep_best and cfg.algo.val_every <= 0:  # the best is chosen by the validation reward
        p.append("checkpoint.keep_best=true needs validation during GRPO: set algo.val_every > 0 (or "
                 "checkpoint.keep_best=false)")
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
    """`synth.*`: an endpoint for every role that goes to one."""
    p, sy = [], cfg.synth
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
