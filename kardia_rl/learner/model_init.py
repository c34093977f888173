"""Loading the learner's model (and its frozen reference) on one rank, with little start-up memory under ZeRO-3.

Full load (ZeRO 0-2, LoRA, or a model without the span tokens): every rank materialises the whole model on CPU
and, when the KL term needs it, a deep copy as the reference: 2 x the model's bytes per rank, transient (for 4
ranks of a 7B bf16 model ~120 GB of host RAM at once).

Partitioned load (learner.partitioned_init under ZeRO-3): transformers' DeepSpeed integration
(HfDeepSpeedConfig -> is_deepspeed_zero3_enabled) builds the model inside deepspeed.zero.Init, so each parameter
is partitioned over the ranks as it is created, and the checkpoint is loaded tensor by tensor into the
partitions (transformers' _load_state_dict_into_zero3_model); the reference is loaded the same way instead of
being copied. A rank then holds 1/W of each model plus one gathered tensor at a time. The global config
weakref that switches transformers into this mode lives only inside `_zero3_loading`, so later from_pretrained
calls in the process (engines, exports) load normally. Not used with LoRA (peft wraps layers of a fully loaded
model; DeepSpeed partitions it at initialize) nor when span tokens must still be added (the embedding resize).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch

from kardia_rl.errors import KardiaError
from kardia_rl.format.tokens import add_span_tokens
from kardia_rl.format.spans import SPAN_TOKENS


def partitioned_load_on(cfg, tokenizer, zero_stage: int) -> bool:
    """True when the partitioned (zero.Init) load applies; see the module docstring for the exclusions."""
    has_spans = all(t in tokenizer.get_vocab() for t in SPAN_TOKENS)
    return bool(cfg.learner.partitioned_init) and zero_stage == 3 and not cfg.model.lora.enabled and has_spans


@contextlib.contextmanager
def _zero3_loading(ds_conf: dict):
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_conf)  # noqa: F841 - transformers holds only a weakref to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def load_models(cfg, model_path: str, dtype: torch.dtype, zero_stage: int, need_ref: bool,
                ds_conf: dict) -> tuple:
    """(tokenizer, model, reference or None, span tokens added, partitioned?) for this rank.

    The reference is a frozen copy of the initial policy (same added-token rows), made before any LoRA/DeepSpeed
    wrapping; with LoRA there is none here (the base model with the adapter disabled serves as reference).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if partitioned_load_on(cfg, tokenizer, zero_stage):
            with _zero3_loading(ds_conf):
                model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
                ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False) \
                    if need_ref else None
            return tokenizer, model, ref, 0, True
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise KardiaError(f"model.path {model_path!r}: cannot load a causal LM ({e})") from e
    # Hub models lack the span tokens: add them (one id each) and grow the embeddings; then the exported model and
    # tokenizer carry them, and the rollout engines must load that export.
    added = add_span_tokens(tokenizer, model)
    ref: Optional[torch.nn.Module] = None
    if need_ref and not cfg.model.lora.enabled:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    return tokenizer, model, ref, added, False


def count_checkpointed_calls(model: torch.nn.Module, owner) -> None:
    """Wrap each layer's checkpoint function so that every call adds 1 to `owner.ckpt_calls`: the metrics
    then show that gradient checkpointing really ran (HF skips it silently outside train mode)."""
    def counted(fn):
        def call(*args, **kwargs):
            owner.ckpt_calls += 1
            return fn(*args, **kwargs)
        return call

    for mod in model.modules():
        if getattr(mod, "gradient_checkpointing", False) and callable(getattr(mod, "_gradient_checkpointing_func",
                                                                               None)):
            mod._gradient_checkpointing_func = counted(mod._gradient_checkpointing_func)
