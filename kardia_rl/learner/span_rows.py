"""The span tokens' rows under LoRA: a small trainable delta beside the frozen embedding and LM-head matrices.

A prepared model starts all eight span tokens from one mean row (model/prepare.py), so their logits are equal at
every position until their rows move; adapters on attention layers alone can never tell `<|emotion_begin|>` from
`<|response_begin|>`. Under LoRA these rows must therefore train, and with untied embeddings (Qwen2.5-7B, Llama 3)
the eight OUTPUT rows of `lm_head` too: its input rows alone leave the span logits identical forever.

Only those rows carry gradients and optimizer state. A `SpanRowDelta` holds `delta` [8, hidden], zero at start, and
is applied through forward hooks on the module that owns the matrix, on that module's device and dtype:
  * the input embedding: `embeds + onehot(ids == span ids) @ delta_in` (the row looked up is W[id] + delta_in);
  * the LM head: `logits[..., span ids] += hidden @ delta_out.T` (the row used is W[id] + delta_out); with tied
    embeddings the head uses `delta_in` as well, exactly as a trained tied row would.
Training the whole matrix behind a gradient mask instead costs a full-matrix gradient and Adam state (about 6.5 GB
at 7B). The deltas are small ordinary parameters of the model, so DeepSpeed places, partitions (ZeRO-3) and
checkpoints them like any other, and the big matrices never need gathering to train them.

The export (learner/export.py) merges them: the engines, save_pretrained folders and checkpoints' HF exports see
`W[span ids] + delta` under the matrix's own name and never a `kardia_span_*` tensor. The LoRA reference (adapter
disabled) runs with `initial_span_rows(model)`: the hooks pass their input through, so the reference scores with
the initial rows, under every ZeRO stage and on any device, without a copy of anything.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

SPAN_IN, SPAN_OUT = "kardia_span_in", "kardia_span_out"  # child-module names on the HF model


class SpanRowDelta(torch.nn.Module):
    """Trainable offsets of the span tokens' rows of one matrix; `target` is that matrix's HF name (export)."""

    def __init__(self, ids: list[int], weight: torch.Tensor, target: str):
        super().__init__()
        hidden = tuple(getattr(weight, "ds_shape", weight.shape))[1]  # ZeRO-3 keeps the full shape in ds_shape
        self.delta = torch.nn.Parameter(torch.zeros(len(ids), hidden, dtype=weight.dtype, device=weight.device))
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=weight.device), persistent=False)
        self.target = target
        self.enabled = True  # False: the initial rows (the LoRA reference)

    def forward(self, kind: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # Called on every forward, enabled or not, so that ZeRO-3 sees the same module order each time.
        if not self.enabled:
            return out
        delta = self.delta.to(out.dtype)
        if kind == "embed":  # x: token ids [...], out: their embeddings [..., H]
            return out + (x.unsqueeze(-1) == self.ids).to(out.dtype) @ delta
        # kind == "logits": x: hidden states [..., H], out: logits [..., V]. In place: the head's backward needs its
        # input and weight, never its output, and a copy of the logits would double their memory.
        return out.index_add_(-1, self.ids, torch.nn.functional.linear(x.to(out.dtype), delta))


def _param_name(base: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(f"{n}.weight" for n, m in base.named_modules() if m is module)


def attach_span_rows(model: torch.nn.Module, tokenizer, lr_scale: float = 1.0) -> list[int]:
    """Add the span-row deltas to `model` (an HF or peft model) and hook them in; returns the span token ids.

    The deltas get no weight decay (decay would pull the rows back toward their start: the old embedding rows
    had none either) and their own learning-rate group at lr x `lr_scale` (model.lora.span_rows_lr_scale,
    ds_config.param_groups)."""
    from kardia_rl.format.tokens import span_token_ids

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # the HF model inside peft
    ids = sorted(span_token_ids(tokenizer).values())
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    tied = head is None or getattr(head, "weight", None) is emb.weight
    span_in = SpanRowDelta(ids, emb.weight, _param_name(base, emb))
    base.add_module(SPAN_IN, span_in)
    rows = {"in": span_in, "out": span_in}
    if not tied:
        rows["out"] = SpanRowDelta(ids, head.weight, _param_name(base, head))
        base.add_module(SPAN_OUT, rows["out"])
    for mod in {id(m): m for m in rows.values()}.values():
        mod.delta.kardia_no_decay = True
        mod.delta.kardia_lr_scale = float(lr_scale)
    emb.register_forward_hook(lambda m, args, kwargs, out: rows["in"](
        "embed", args[0] if args else kwargs["input"], out), with_kwargs=True)
    if head is not None:
        head.register_forward_hook(lambda m, args, kwargs, out: rows["out"](
            "logits", args[0] if args else kwargs["input"], out), with_kwargs=True)
    return ids


def span_row_deltas(module: torch.nn.Module) -> dict[str, SpanRowDelta]:
    """{HF name of the matrix: its delta} in `module` (empty without LoRA span rows)."""
    return {m.target: m for m in module.modules() if isinstance(m, SpanRowDelta)}


@contextlib.contextmanager
def initial_span_rows(module: torch.nn.Module):
    """Forwards inside see the span rows as they were before training (the deltas switched off)."""
    mods = [m for m in module.modules() if isinstance(m, SpanRowDelta)]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


def merged_rows(weight: torch.Tensor, mod: Optional[SpanRowDelta]) -> torch.Tensor:
    """A copy of `weight` (gathered, full) with its span rows moved by the delta: what engines and exports get."""
    w = weight.detach().clone()
    if mod is not None:
        w[mod.ids.to(w.device)] += mod.delta.detach().to(w.device, w.dtype)
    return w
