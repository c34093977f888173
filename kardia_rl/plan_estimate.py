"""Model architectures and memory formulas of `kardia-rl plan` (no torch, no GPU, no model weights).

A model is described by its architecture (`Arch`, read from a config.json found in a local folder or the HF
cache, from the local tiny/small sizes, or from a table of known models: `resolve_model`);
every estimate is in bytes and documented in docs/cluster.md ("The preflight plan and its formulas"). The formulas assume a dense
Llama/Qwen2/Qwen3-style decoder (RMSNorm, GQA attention through SDPA, SwiGLU MLP) as HF implements it.
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from kardia_rl.utils.hardware import auto_dtype

GiB = float(1 << 30)
CUDA_CONTEXT_BYTES = 1 << 30  # CUDA context + NCCL buffers + cuBLAS workspace of one GPU process (observed 0.6-1 GiB)
FRAGMENTATION = 1.10  # PyTorch caching allocator: reserved is typically 5-15% above allocated at peak
JUDGE_PROMPT_TOKENS = 1024  # rubric instructions + profile + history framing around the candidate (judge prompt)

# Architectures of the models conf/cluster.yaml names, for when neither a local folder nor the HF cache has
# their config.json (values from the models' published config.json).
KNOWN_MODELS = {
    "Qwen/Qwen2.5-7B-Instruct": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                                     intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                     num_key_value_heads=4, tie_word_embeddings=False,
                                     max_position_embeddings=32768),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=False, max_position_embeddings=40960),
}
KNOWN_MODELS["Qwen/Qwen2.5-7B"] = KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"]


@dataclass(frozen=True)
class Arch:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    max_positions: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        H, q, kv = self.hidden, self.q_dim, self.kv_dim
        attn = H * q + 2 * H * kv + q * H + (q + 2 * kv if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
        return attn + 3 * H * self.intermediate + 2 * H

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int, targets) -> int:
        H, q, kv, inter = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        shapes = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
                  "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H)}
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)


def arch_from_config(d: dict) -> Arch:
    """An `Arch` from a HF config.json dict (missing head_dim / kv heads take the usual defaults)."""
    d = dict(d.get("text_config") or {}, **{k: v for k, v in d.items() if k != "text_config"})
    try:
        H, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        return Arch(vocab=int(d["vocab_size"]), hidden=H, layers=int(d["num_hidden_layers"]),
                    intermediate=int(d["intermediate_size"]), heads=heads,
                    kv_heads=int(d.get("num_key_value_heads") or heads),
                    head_dim=int(d.get("head_dim") or H // heads), tied=bool(d.get("tie_word_embeddings", False)),
                    qkv_bias=bool(d.get("attention_bias", d.get("model_type") == "qwen2")),
                    qk_norm=d.get("model_type") in ("qwen3", "qwen3_moe"),
                    max_positions=int(d.get("max_position_embeddings") or 0))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json lacks a dense-decoder field ({e})") from None


def dtype_bytes(dtype: str, gpu: bool) -> int:
    """model.dtype / judge.dtype -> bytes per weight (auto: utils.hardware.auto_dtype)."""
    return 4 if auto_dtype(dtype, gpu) == "float32" else 2


def layer_activation_bytes(a: Arch, b: int) -> int:
    """Bytes saved for backward per token in ONE decoder layer (training, no checkpointing).

    Two RMSNorms each keep their fp32 upcast input and the normalised output: 2(4+b)H. Attention keeps
    q, k, v after RoPE (q + 2kv), the SDPA output and the o_proj input copy (2q): b(3q + 2kv); SDPA's
    memory-efficient/flash kernels keep no S x S matrix. SwiGLU keeps gate, up, act(gate), and the
    down_proj input: 4bI.
    """
    return 2 * (4 + b) * a.hidden + b * (3 * a.q_dim + 2 * a.kv_dim) + 4 * b * a.intermediate


def activation_bytes(a: Arch, tokens: int, b: int, checkpointing: bool) -> int:
    """Activations of one micro-batch of `tokens` tokens. With (per-layer, non-reentrant) checkpointing only
    each layer's input hidden state is kept, plus one layer's activations while it is recomputed."""
    per_layer = layer_activation_bytes(a, b)
    if checkpointing:
        return tokens * (a.layers * b * a.hidden + per_layer)
    return tokens * a.layers * per_layer


def logits_bytes(a: Arch, rows: int, positions: int, b: int) -> int:
    """Scored positions' logits: the model's logits (b), the fp32 log-softmax kept for backward (4) and the
    logits' gradient (b). GRPO scores response positions only (logits_to_keep); SFT scores every position."""
    return rows * positions * a.vocab * (4 + 2 * b)


# Rows per chunk of the loss's fp32 work over the vocabulary: the `chunk_rows` default of learner/logprobs.py's
# gather_logprobs, chunked_entropy and sft_loss_sum (tests/test_plan.py checks they agree).
LOSS_CHUNK_ROWS = 4
# fp32 [chunk rows, positions, vocab] temporaries alive at once on top of `logits_bytes` (which holds the logits,
# the fp32 copy kept for backward and the logits' gradient), measured by bench/bench_loss_memory.py (peak RSS in fp32
# chunks, bf16 and fp32): GRPO's chunked_entropy holds the fp32 copy, log_softmax, its exp and their product at once
# (4.0 chunks; the log-prob gather needs less: 2.0 forward, 3.0 backward with the gradient). SFT's cross-entropy:
# 2.0 forward in bf16 (the fp32 copy and the kept log_softmax), 2.0 backward with the gradient: 2 bounds both.
LOSS_TEMP_COPIES = {"GRPO": 4, "SFT": 2}


def loss_temporary_bytes(a: Arch, rows: int, positions: int, role: str) -> int:
    """The loss's fp32 temporaries over the vocabulary (one chunk of rows at a time), beyond `logits_bytes`."""
    return LOSS_TEMP_COPIES[role] * min(rows, LOSS_CHUNK_ROWS) * positions * a.vocab * 4


def learner_state_bytes(a: Arch, *, world: int, stage: int, b: int, trainable: int, reference: bool) -> dict:
    """Per-rank weights / gradients / optimizer state of AdamW under DeepSpeed ZeRO `stage` on `world` ranks.

    bf16 (b=2): weights 2P, gradients 2P_t plus DeepSpeed's fp32 gradient partition 4P_t/W, optimizer 12P_t
    (fp32 master weights + Adam m and v). fp32 (b=4): 4P, 4P_t, 8P_t. Stage 1 partitions the optimizer state,
    stage 2 also the gradients, stage 3 also the weights (plus a working set of gathered weights: two
    layers, or the embedding when larger). P_t = trainable parameters (LoRA: the adapters plus the span tokens'
    row deltas, learner/span_rows.py). A frozen
    reference (LossSpec.reference_copy) adds bP, partitioned under stage 3.
    """
    P, Pt = a.params(), trainable
    opt_per = 12 if b == 2 else 8
    part_opt, part_grad, part_w = stage >= 1, stage >= 2, stage >= 3
    weights = b * P / (world if part_w else 1)
    if part_w:
        weights += 2 * b * max(a.layer_params(), a.vocab * a.hidden)
    grads = b * Pt / (world if part_grad else 1) + (4 * Pt / world if b == 2 else 0)
    opt = opt_per * Pt / (world if part_opt else 1)
    ref = (b * P / (world if part_w else 1)) if reference else 0
    return {"weights": weights, "grads": grads, "optimizer": opt, "reference": ref}


def kv_bytes_per_token(a: Arch, b: int) -> int:
    """vLLM KV cache: keys and values of every layer: 2 * layers * kv_heads * head_dim * b."""
    return 2 * a.layers * a.kv_dim * b


def gib(x: float) -> float:
    return round(x / GiB, 2)


def human(x: float) -> str:
    """Bytes as GiB (MiB below 1 GiB) for the plan's lines."""
    return f"{x / GiB:.2f} GiB" if x >= GiB else f"{x / (1 << 20):.1f} MiB"


def ceil_div(x: int, y: int) -> int:
    return int(math.ceil(x / max(y, 1)))


@dataclass
class Model:
    name: str
    arch: Optional[Arch]
    source: str
    span_tokens: Optional[bool] = None  # None: unknown (no tokenizer files to read)


def _hf_cache_dirs() -> list[str]:
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return [d for d in (os.environ.get("HF_HUB_CACHE"), os.path.join(home, "hub")) if d]


def _has_span_tokens(folder: str) -> Optional[bool]:
    from kardia_rl.format.spans import SPAN_TOKENS

    texts = []
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    if not texts:
        return None
    return all(any(t in text for text in texts) for t in SPAN_TOKENS)


def _gguf_model(key: str, name: str, problems: list) -> Model:
    """A .gguf source: checked to exist; the model stage dequantises it and adds the span tokens. Its architecture
    is not read here (parsing GGUF metadata takes ~15 s on a busy CPU), so no memory estimate for it."""
    from kardia_rl.errors import KardiaError
    from kardia_rl.model.prepare import resolve_source

    try:
        src = resolve_source(name, key)
    except KardiaError as e:
        problems.append(str(e))
        return Model(name, None, "missing")
    return Model(name, None, f"GGUF {os.path.join(src.local, src.gguf_file)}, prepared by the model stage", True)


def resolve_model(key: str, name: str, problems: list) -> Model:
    """A model's architecture from a local folder, a model this run builds (builtin:SIZE), the HF cache, or
    KNOWN_MODELS."""
    if os.path.isfile(os.path.join(name, "config.json")):
        with open(os.path.join(name, "config.json")) as f:
            d = json.load(f)
        try:
            return Model(name, arch_from_config(d), f"local folder {name}", _has_span_tokens(name))
        except ValueError as e:
            problems.append(f"{key}: {name}/config.json: {e}; the plan estimates dense decoders only")
            return Model(name, None, "unreadable")
    if name.startswith("builtin:"):
        from kardia_rl.model.tiny import SIZES

        size = name[len("builtin:"):]
        if size not in SIZES:
            problems.append(f"{key}: {name!r}: unknown builtin model; choose " + " | ".join("builtin:" + z for z in SIZES))
            return Model(name, None, "missing")
        s = SIZES[size]
        arch = arch_from_config(dict(model_type="qwen2", vocab_size=s.vocab_size, hidden_size=s.hidden_size,
                                     num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                                     num_key_value_heads=s.num_key_value_heads, intermediate_size=s.intermediate_size,
                                     tie_word_embeddings=True, max_position_embeddings=2048))
        return Model(name, arch, "a random model built under run_dir by the model stage", True)
    if name.endswith(".gguf") or name.startswith("pkg:"):  # prepared by the model stage (kardia_rl.model.prepare)
        return _gguf_model(key, name, problems)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        problems.append(f"{key}: {name!r}: no config.json there, and it is not a Hugging Face model name "
                        "(org/name); point it at a save_pretrained folder")
        return Model(name, None, "missing")
    for cache in _hf_cache_dirs():
        for cfg_file in sorted(glob.glob(os.path.join(cache, "models--" + name.replace("/", "--"), "snapshots",
                                                      "*", "config.json"))):
            folder = os.path.dirname(cfg_file)
            with open(cfg_file) as f:
                return Model(name, arch_from_config(json.load(f)), f"HF cache {folder}", _has_span_tokens(folder))
    if name in KNOWN_MODELS:
        return Model(name, arch_from_config(KNOWN_MODELS[name]),
                     "known architecture; not in the HF cache here, downloaded at run time (every node needs "
                     "the hub or a shared HF_HOME)", False)
    problems.append(f"{key}: {name!r} is not a local folder, not in the Hugging Face cache ({', '.join(_hf_cache_dirs())})"
                    f" and not a known architecture ({', '.join(sorted(KNOWN_MODELS))}): download it first "
                    f"(huggingface-cli download {name}) or give a local folder")
    return Model(name, None, "unresolved")
