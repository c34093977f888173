"""Exporting the learner's weights in Hugging Face form: a state dict for the rollout engines, and a
save_pretrained folder that AutoModelForCausalLM and vLLM load.

Three complications handled here and nowhere else:
  * ZeRO-3 shards every parameter across ranks: each one is gathered (collectively, so every rank must call
    these functions) one module at a time, which bounds the extra memory to the largest module;
  * LoRA (peft) renames the wrapped layers (`q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`):
    the exported weight is the merged `W + scale * B @ A` under the original HF name, so engines and users
    never see adapter names;
  * tied embeddings: the tied `lm_head.weight` is not listed (named_parameters() deduplicates it), exactly
    as save_pretrained writes it; loaders re-tie it from `embed_tokens`.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Optional

import torch

from kardia_rl.utils.io import atomic_dir


def _gathered(params: list, zero3: bool):
    if not zero3 or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def unwrap_peft(module: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """(the HF model inside a peft wrapper, whether it was wrapped)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a core dependency, but keep export usable without it
        return module, False
    if isinstance(module, PeftModel):
        return module.get_base_model(), True
    return module, False


@torch.no_grad()
def hf_state_dict(module: torch.nn.Module, *, zero3: bool = False, dtype: Optional[torch.dtype] = None
                  ) -> dict[str, torch.Tensor]:
    """CPU tensors keyed by HF names (LoRA merged, ZeRO-3 gathered). Collective under ZeRO-3."""
    base, is_peft = unwrap_peft(module)
    lora_layers: dict[str, Any] = {}
    if is_peft:
        from peft.tuners.lora import LoraLayer

        lora_layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        t = t.detach()
        out[name] = (t.to(dtype) if dtype is not None else t).to("cpu", copy=True).contiguous()

    for name, layer in lora_layers.items():
        with _gathered(list(layer.parameters()), zero3):
            w = layer.base_layer.weight.detach().clone()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A and not getattr(layer, "merged", False):
                    w += layer.get_delta_weight(adapter).to(w.dtype)
            put(f"{name}.weight", w)
            if getattr(layer.base_layer, "bias", None) is not None:
                put(f"{name}.bias", layer.base_layer.bias)
    prefixes = tuple(f"{n}." for n in lora_layers)
    for name, p in base.named_parameters():
        if prefixes and name.startswith(prefixes):
            continue
        with _gathered([p], zero3):
            put(name, p)
    persistent = set(base.state_dict().keys())
    for name, b in base.named_buffers():
        if name in persistent and not (prefixes and name.startswith(prefixes)):
            put(name, b)
    return out


def save_hf_folder(state_dict: dict[str, torch.Tensor], out_dir: str, config: Any, *,
                   generation_config: Any = None, tokenizer: Any = None, max_shard_size: str = "5GB") -> str:
    """Write an HF model folder atomically: everything goes to a temporary sibling folder that is renamed
    over `out_dir` at the end, so a crash never leaves a half-written model where a loader looks."""
    from huggingface_hub import save_torch_state_dict

    with atomic_dir(out_dir) as tmp:
        save_torch_state_dict(state_dict, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        config = copy.deepcopy(config)  # do not touch the live model's config
        if len(dtypes) == 1:
            config.dtype = next(iter(dtypes))
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
