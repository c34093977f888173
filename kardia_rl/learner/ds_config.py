"""DeepSpeed configuration, optimizer and LR schedule for the learner (pure construction, no training).

Choices and why:
  * gradient accumulation is NOT managed by DeepSpeed (`managed_gradient_accumulation: false`): a GRPO
    batch has a variable number of micro-batches (token budget, dropped groups), and the learner owns the
    boundary by calling `engine.step()` once after its last backward. Losses are already normalised by the
    global token/sequence counts, so backward runs with `scale_wrt_gas=False`.
  * non-finite steps: with ZeRO 1-3 DeepSpeed's own overflow check skips a step whose gradient norm is
    inf/NaN (fp32 always; bf16 via `check_grad_overflow`, set explicitly). ZeRO stage 0 hands the client
    optimizer to torch as it is, so there the optimizer is wrapped by `guarded()`, which does the same.
  * optimizer: a client torch AdamW by default (no C++ build); `deepspeed_adamw` asks DeepSpeed for its
    AdamW (FusedAdam on GPU; its torch implementation on CPU, since the fused op needs a 35 s JIT build).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from kardia_rl.config.schema import LR_SCHEDULES, MODEL_DTYPES, OPTIMIZERS
from kardia_rl.config.specs import OptimSpec  # noqa: F401  (defined beside LossSpec; learner code imports it here)
from kardia_rl.errors import ConfigError
from kardia_rl.learner.export import full_shape
from kardia_rl.utils.hardware import auto_dtype


def torch_dtype(name: str, cuda: bool) -> torch.dtype:
    """model.dtype as the learner's torch dtype (auto: utils.hardware.auto_dtype)."""
    name = auto_dtype(name, cuda)
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ConfigError(f"model.dtype: {name!r} is not one of {list(MODEL_DTYPES)}")
    return table[name]


def ds_config(*, zero_stage: int, micro_batch_size: int, world_size: int, dtype: torch.dtype,
              max_grad_norm: float, optimizer: str, lr: float, weight_decay: float, cuda: bool,
              train: bool = True) -> dict:
    """The DeepSpeed config dict (also used, with `train=False`, for a ZeRO-3 inference-only reference)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"learner.zero_stage: {zero_stage} is not one of [0, 1, 2, 3]")
    bf16 = dtype == torch.bfloat16
    cfg: dict = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
    }
    if not train:
        return cfg
    cfg["managed_gradient_accumulation"] = False
    # Stage 0: the guarded client optimizer clips (so it can report the pre-clip norm and skip first).
    cfg["gradient_clipping"] = 0.0 if zero_stage == 0 else float(max_grad_norm)
    if bf16 and zero_stage > 0:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}  # accumulate micro-batch grads in fp32
    if optimizer == "deepspeed_adamw" and zero_stage > 0:
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
            "torch_adam": not cuda}}
    elif optimizer not in OPTIMIZERS:
        raise ConfigError(f"learner.optimizer: {optimizer!r} is not one of {list(OPTIMIZERS)}")
    return cfg


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 lr: float = 0.0) -> list[dict]:
    """Trainable parameters, with no weight decay on biases and norm weights (1-D tensors), as usual, nor on
    weights marked `kardia_no_decay` (the span rows' deltas, learner/span_rows.py). Dimensions are the FULL
    shape: under deepspeed.zero.Init every parameter is a 1-D partition and only `ds_shape` tells a matrix.
    A weight marked `kardia_lr_scale` != 1 (the span rows, model.lora.span_rows_lr_scale) gets its own group at
    lr x scale; the LR schedule multiplies every group's rate alike, so the ratio holds."""
    decay, no_decay, scaled = [], [], {}
    for _, p in named_params:
        if not p.requires_grad:
            continue
        scale = getattr(p, "kardia_lr_scale", 1.0)
        if scale != 1.0:
            scaled.setdefault(scale, []).append(p)
        else:
            (decay if len(full_shape(p)) >= 2 and not getattr(p, "kardia_no_decay", False) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": ps, "weight_decay": 0.0, "lr": lr * s} for s, ps in scaled.items()]
    return [g for g in groups if g["params"]]


class _GuardMixin:
    """Skip-on-non-finite and clipping for a plain torch optimizer (ZeRO stage 0 only).

    Exposes `overflow` and `_global_grad_norm`, the attributes DeepSpeed's engine reads after
    `optimizer.step()` to count skipped steps, hold the LR schedule back, and report the grad norm.
    """

    max_grad_norm: float = 0.0

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401  (torch optimizer API)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad = None
            return None
        if self.max_grad_norm > 0 and self._global_grad_norm > self.max_grad_norm:
            scale = self.max_grad_norm / (self._global_grad_norm + 1e-6)
            for g in grads:
                g.mul_(scale)
        return super().step(closure)


def guarded(opt_cls: type, max_grad_norm: float) -> type:
    """A subclass of `opt_cls` with `_GuardMixin` (kept a real torch optimizer, as DeepSpeed expects)."""
    return type(f"Guarded{opt_cls.__name__}", (_GuardMixin, opt_cls), {"max_grad_norm": float(max_grad_norm)})


def make_client_optimizer(module: torch.nn.Module, *, zero_stage: int, optimizer: str, lr: float,
                          weight_decay: float, max_grad_norm: float, cuda: bool) -> Optional[torch.optim.Optimizer]:
    """The client optimizer to hand to `deepspeed.initialize`, or None when DeepSpeed builds its own."""
    groups = param_groups(module.named_parameters(), weight_decay, lr)
    if not groups:
        raise ConfigError("the model has no trainable parameters (LoRA target_modules matched nothing?)")
    if optimizer == "deepspeed_adamw" and zero_stage > 0:
        return None
    cls = torch.optim.AdamW
    if optimizer == "deepspeed_adamw" and cuda:
        from deepspeed.ops.adam import FusedAdam

        cls = FusedAdam  # adam_w_mode defaults to True
    if zero_stage == 0:
        cls = guarded(cls, max_grad_norm)
    return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def warmup_lambda(warmup_steps: int, total_steps: int = 0, schedule: str = "constant"):
    """LR multiplier per applied optimizer step: linear warm-up, then constant, or linear decay to 0 over
    `total_steps` (decay needs total_steps > 0). Skipped steps do not advance it."""
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr schedule {schedule!r} is not one of {list(LR_SCHEDULES)}")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - frac
    return f
