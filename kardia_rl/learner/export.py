"""Exporting the learner's weights in Hugging Face form: a state dict for the rollout engines, and a
save_pretrained folder that AutoModelForCausalLM and vLLM load.

Exports are written by one rank (learner rank 0) as the tensors arrive, shard by shard (`write_hf_folder`);
under ZeRO-3 the other ranks only join the gathers (`keep=False`), so no rank but the writer holds a copy.

Complications handled here and nowhere else:
  * ZeRO-3 shards every parameter across ranks: they are gathered (collectively, so every rank must call
    these functions) one bucket at a time, which bounds the extra memory to one bucket (or one tensor);
  * LoRA (peft) renames the wrapped layers (`q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`):
    the exported weight is the merged `W + scale * B @ A` under the original HF name, so engines and users
    never see adapter names;
  * tied embeddings: the tied `lm_head.weight` is not listed (named_parameters() deduplicates it), exactly
    as save_pretrained writes it; loaders re-tie it from `embed_tokens`;
  * the LoRA span rows (learner/span_rows.py) live in small `kardia_span_*` deltas: they are merged into the
    embedding (and untied head) rows under the matrices' own names, and never exported themselves.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any, Iterable, Iterator, Optional

import torch

from kardia_rl.learner.span_rows import SPAN_IN, SPAN_OUT, merged_rows, span_row_deltas
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


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape


def _units(module: torch.nn.Module) -> list[tuple[str, list, Any, tuple, torch.dtype]]:
    """What the export yields, in order: (HF name, parameters to gather, producer, full shape, dtype).

    One unit per exported tensor; a LoRA layer's merged weight needs its base weight and adapters together.
    """
    base, is_peft = unwrap_peft(module)
    lora_layers: dict[str, Any] = {}
    if is_peft:
        from peft.tuners.lora import LoraLayer

        lora_layers = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    units: list = []

    def merged(layer):
        def produce():
            w = layer.base_layer.weight.detach().clone()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A and not getattr(layer, "merged", False):
                    w += layer.get_delta_weight(adapter).to(w.dtype)
            return w
        return produce

    for name, layer in lora_layers.items():
        w = layer.base_layer.weight
        units.append((f"{name}.weight", list(layer.parameters()), merged(layer), full_shape(w), w.dtype))
        bias = getattr(layer.base_layer, "bias", None)
        if bias is not None:
            units.append((f"{name}.bias", [bias], lambda b=bias: b, full_shape(bias), bias.dtype))
    prefixes = tuple(f"{n}." for n in lora_layers) + (f"{SPAN_IN}.", f"{SPAN_OUT}.")
    for name, p in base.named_parameters():
        if not name.startswith(prefixes):
            units.append((name, [p], lambda p=p: p, full_shape(p), p.dtype))
    deltas = span_row_deltas(base)
    for i, (name, params, produce, shape, dt) in enumerate(units):
        if name in deltas:  # the span rows' delta merged into its matrix (gathered with it under ZeRO-3)
            mod = deltas[name]
            units[i] = (name, params + [mod.delta], lambda f=produce, m=mod: merged_rows(f(), m), shape, dt)
    persistent = set(base.state_dict().keys())
    for name, b in base.named_buffers():
        if name in persistent and not name.startswith(prefixes):
            units.append((name, [], lambda b=b: b, tuple(b.shape), b.dtype))
    return units


def hf_metadata(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> list[tuple[str, str, list[int]]]:
    """(name, dtype name, full shape) of every exported tensor, in `iter_hf_tensors` order; gathers nothing."""
    return [(name, str(dtype or dt).split(".")[-1], list(shape)) for name, _, _, shape, dt in _units(module)]


@torch.no_grad()
def iter_hf_tensors(module: torch.nn.Module, *, zero3: bool = False, dtype: Optional[torch.dtype] = None,
                    device: Any = "cpu", bucket_bytes: int = 0, keep: bool = True
                    ) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """Stream (HF name, tensor copy on `device`) pairs: LoRA merged, ZeRO-3 gathered ONE BUCKET AT A TIME.

    Under ZeRO-3 the gather is collective: every rank must iterate in lockstep; the extra memory is one
    bucket of gathered parameters (`bucket_bytes`, or one unit when 0) plus the copies being consumed.
    keep=False (the ranks whose copy nobody reads: all but the writer of an export): the rank only joins the
    gathers and yields (name, None), making no copy and no LoRA merge.
    """
    units = _units(module)
    groups: list[list] = []
    size = 0
    for unit in units:
        nbytes = math.prod(unit[3]) * unit[4].itemsize
        if not groups or (size + nbytes > bucket_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += nbytes
    for group in groups:
        with _gathered([p for u in group for p in u[1]], zero3):
            for name, _, produce, _, _ in group:
                if not keep:
                    yield name, None
                    continue
                t = produce().detach()
                yield name, (t.to(dtype) if dtype is not None else t).to(device, copy=True).contiguous()


def hf_state_dict(module: torch.nn.Module, *, zero3: bool = False, dtype: Optional[torch.dtype] = None,
                  keep: bool = True) -> dict[str, torch.Tensor]:
    """CPU tensors keyed by HF names (LoRA merged, ZeRO-3 gathered). Collective under ZeRO-3; keep=False joins
    the gathers and returns {} (see iter_hf_tensors)."""
    return {k: v for k, v in iter_hf_tensors(module, zero3=zero3, dtype=dtype, keep=keep) if v is not None}


def shard_plan(meta: list[tuple[str, str, list[int]]], max_shard_bytes: int) -> tuple[dict[str, int], list[int]]:
    """{name: shard index} in export order, a new shard when the next tensor would pass `max_shard_bytes`;
    and the number of tensors in each shard (a shard is written when its last tensor arrived)."""
    where: dict[str, int] = {}
    counts: list[int] = []
    size = 0
    for name, dt, shape in meta:
        nbytes = math.prod(shape) * getattr(torch, dt).itemsize
        if not counts or (size + nbytes > max_shard_bytes and counts[-1]):
            counts.append(0)
            size = 0
        where[name] = len(counts) - 1
        counts[-1] += 1
        size += nbytes
    return where, counts


def write_hf_folder(tensors: Iterable[tuple[str, torch.Tensor]], meta: list[tuple[str, str, list[int]]],
                    out_dir: str, config: Any, *, generation_config: Any = None, tokenizer: Any = None,
                    max_shard_bytes: int = 5 * 10**9) -> str:
    """Write an HF model folder atomically from a STREAM of tensors (`meta`: hf_metadata, same order): each
    safetensors shard is written as soon as its last tensor arrived and then dropped, so the writer holds one
    shard, never the whole model. Files as save_pretrained names them (model.safetensors, or
    model-0000i-of-0000N.safetensors with model.safetensors.index.json). Everything goes to a temporary
    sibling folder renamed over `out_dir` at the end: a crash never leaves a half-written model."""
    import json

    from safetensors.torch import save_file

    where, counts = shard_plan(meta, max_shard_bytes)
    n = len(counts)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    pending: dict[int, dict[str, torch.Tensor]] = {}
    total = 0
    dtypes = set()
    with atomic_dir(out_dir) as tmp:
        for name, t in tensors:
            i = where[name]
            pending.setdefault(i, {})[name] = t
            total += t.numel() * t.element_size()
            if t.is_floating_point():
                dtypes.add(t.dtype)
            if len(pending[i]) == counts[i]:
                save_file(pending.pop(i), os.path.join(tmp, names[i]), metadata={"format": "pt"})
        if pending or len(where) != sum(counts):
            raise RuntimeError(f"export of {out_dir}: the tensor stream ended before shards {sorted(pending)}")
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in where.items()}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        config = copy.deepcopy(config)  # do not touch the live model's config
        if len(dtypes) == 1:
            config.dtype = next(iter(dtypes))
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def save_hf_folder(state_dict: dict[str, torch.Tensor], out_dir: str, config: Any, **kw) -> str:
    """`write_hf_folder` of a state dict already in memory."""
    meta = [(k, str(v.dtype).split(".")[-1], list(v.shape)) for k, v in state_dict.items()]
    return write_hf_folder(state_dict.items(), meta, out_dir, config, **kw)
