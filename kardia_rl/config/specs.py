"""What a learner optimises (OptimSpec) and the GRPO objective (LossSpec), each built once from the config, so
the processes that need them (driver, learner, plan) read one derivation instead of re-deriving from raw keys.
Here, beside the config and below every room that reads them (plan included)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LossSpec:
    """The GRPO objective: where the KL term goes, what it needs, the sampling temperature the learner scores
    tokens under, and the generation length. `from_config` reads a resolved config (presets applied)."""
    kl_beta: float  # algo.kl_beta
    kl_in: str  # algo.kl_in: loss | reward
    kl_estimator: str  # algo.kl_estimator, resolved by the preset for kl_in
    clip_eps: float
    clip_eps_high: Optional[float]  # None: symmetric clipping (algo.clip_eps_high = 0)
    loss_agg: str
    is_cap: float
    importance_correction: Optional[bool]  # None: on iff the engines do not sample in fp32
    temperature: float  # rollout.temperature: the learner's logprobs are of the same tempered softmax
    max_new_tokens: int  # model.max_new_tokens: the length limit (loss normalisation, overlong answers)
    lora: bool  # model.lora.enabled: the reference is the base model with the adapter switched off
    max_staleness: int = 0  # algo.max_staleness: 1 = one-step-off (samples from weights 0 or 1 update old)
    behaviour_logprobs: str = ""  # algo.behaviour_logprobs at max_staleness 1: recompute | engine

    @classmethod
    def from_config(cls, cfg) -> "LossSpec":
        ac = cfg.algo
        return cls(kl_beta=float(ac.kl_beta), kl_in=ac.kl_in, kl_estimator=ac.kl_estimator,
                   clip_eps=ac.clip_eps, clip_eps_high=ac.clip_eps_high or None, loss_agg=ac.loss_agg,
                   is_cap=ac.is_cap, importance_correction=ac.importance_correction,
                   temperature=float(cfg.rollout.temperature), max_new_tokens=int(cfg.model.max_new_tokens),
                   lora=bool(cfg.model.lora.enabled), max_staleness=int(ac.max_staleness),
                   behaviour_logprobs=ac.behaviour_logprobs)

    @property
    def beta_in_loss(self) -> float:
        """The KL coefficient of the loss term (0 when the KL goes into the reward)."""
        return self.kl_beta if self.kl_in == "loss" else 0.0

    @property
    def kl_in_reward(self) -> bool:
        """The driver subtracts the KL from the rewards before the advantages."""
        return self.kl_in == "reward" and self.kl_beta > 0

    @property
    def reference(self) -> bool:
        """Reference logprobs are needed (a KL term, wherever it goes)."""
        return self.kl_beta > 0

    @property
    def reference_copy(self) -> bool:
        """A frozen copy of the weights is held (its memory in the plan); LoRA's reference is the base itself."""
        return self.reference and not self.lora

    @property
    def engine_old(self) -> bool:
        """One-step-off with behaviour_logprobs=engine: the loss's old log-probs are the engine's sampling ones."""
        return self.max_staleness > 0 and self.behaviour_logprobs == "engine"

    def importance_correction_on(self, engine_fp32: bool) -> bool:
        """algo.importance_correction, with null (auto) = on when the engines do not sample in fp32 (bf16/fp16
        kernels give the engine a measurably different distribution; fp32 matches to ~1e-5), and always at
        one-step-off with recomputed old log-probs: there the IS weight corrects for the one-update-old behaviour."""
        if self.importance_correction is None and self.max_staleness > 0 and self.behaviour_logprobs == "recompute":
            return True
        return not engine_fp32 if self.importance_correction is None else bool(self.importance_correction)


@dataclass(frozen=True)
class OptimSpec:
    """What a learner optimises and how, so the learner itself reads no role-specific config section.

    `grpo(cfg)` reads cfg.learner (and LossSpec's `reference`: the objective has a KL term), `sft(cfg, total_steps)`
    reads cfg.sft's rate, micro-batch and schedule; both share cfg.learner's optimizer, weight decay and
    clipping. `total_steps` is the horizon of a decaying schedule (0: none known).
    """
    lr: float
    micro_batch_size: int
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "torch_adamw"
    reference: bool = False  # load a frozen reference model (the objective has a KL term to it)

    @classmethod
    def grpo(cls, cfg) -> "OptimSpec":
        lc = cfg.learner
        return cls(lr=lc.lr, micro_batch_size=lc.micro_batch_size, warmup_steps=lc.warmup_steps,
                   weight_decay=lc.weight_decay, max_grad_norm=lc.max_grad_norm, optimizer=lc.optimizer,
                   reference=LossSpec.from_config(cfg).reference)

    @classmethod
    def sft(cls, cfg, total_steps: int = 0) -> "OptimSpec":
        lc, sc = cfg.learner, cfg.sft
        return cls(lr=sc.lr, micro_batch_size=sc.micro_batch_size, warmup_steps=sc.warmup_steps,
                   schedule=sc.lr_schedule, total_steps=total_steps, weight_decay=lc.weight_decay,
                   max_grad_norm=lc.max_grad_norm, optimizer=lc.optimizer)
