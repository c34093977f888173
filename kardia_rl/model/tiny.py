"""A tiny Qwen2-architecture model and byte-level BPE tokenizer built locally (no model hub).

Used by the tests and the quickstart. The tokenizer is trained with exactly Qwen2's normalizer (NFC) and
pre-tokenizer (Qwen2's regex Split, then ByteLevel without regex): transformers 5 rebuilds those two
components whenever config.json says `qwen2`, so anything else would change token ids after a reload.
The span tokens and ChatML markers are atomic special tokens; the chat template is ChatML (as Qwen2.5).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Iterator

from kardia_rl.errors import KardiaError
from kardia_rl.format.spans import SPAN_TOKENS

QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + SPAN_TOKENS
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


SIZES = {
    # ~1M parameters: fast enough for every test on 2 CPU cores.
    "tiny": ModelSize(3072, 128, 2, 4, 2, 384),
    # ~20M parameters: the "small" benchmark model.
    "small": ModelSize(4096, 512, 6, 8, 4, 1408),
}


def corpus_texts() -> Iterator[str]:
    """Tokenizer training text: the bundled training dialogues plus Python's own pydoc topics.

    Template-like dialogue text alone runs out of merges early, so varied English prose is mixed in; both
    ship with the environment (no downloads). Test dialogues are excluded.
    """
    path = resources.files("kardia_rl") / "resources" / "sample_data" / "train.jsonl"
    with path.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            yield rec["person"]
            yield rec["situation"]
            for m in rec["messages"]:
                yield m["content"]
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE with Qwen2's normalizer and pre-tokenizer, as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, *SPAN_TOKENS])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(out_dir: str, size: str = "tiny", seed: int = 0, overwrite: bool = False,
                     tie_word_embeddings: bool = True) -> str:
    """Train the tokenizer, initialise the model from `seed`, save both to `out_dir` atomically.

    `tie_word_embeddings=False` gives the LM head its own matrix (as Qwen2.5-7B, Qwen3-8B and Llama 3 have), so the
    code paths that treat untied heads differently (the LoRA span rows, the weight sync's read-back) are tested too."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if size not in SIZES:
        raise KardiaError(f"--size {size!r}: choose one of {sorted(SIZES)}")
    if os.path.exists(out_dir) and not overwrite:
        raise KardiaError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    spec = SIZES[size]
    tokenizer = train_tokenizer(corpus_texts(), spec.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    from kardia_rl.utils.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def cmd_init_model(args) -> int:
    """`kardia-rl init-model --out DIR`: build a tiny/small local Qwen2 model and tokenizer (no downloads)."""
    out = build_tiny_model(args.out, args.size, args.seed, args.overwrite, tie_word_embeddings=not args.untied)
    print(f"built {args.size} model{' (untied LM head)' if args.untied else ''} and tokenizer in {out}")
    return 0


def configure_init_model(p) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--untied", action="store_true", help="give the LM head its own matrix (default: tied to the "
                                                         "input embedding)")


cmd_init_model.configure = configure_init_model
