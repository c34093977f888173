"""Adding the eight span tokens to any Hugging Face tokenizer/model.

They are added as *special* tokens so each stays one id (the parser, the stop condition and the format
reward rely on that) and is never split by BPE. New embedding rows are initialised by transformers'
resize (mean of existing embeddings), which keeps the first forward passes stable.
"""
from __future__ import annotations

from typing import Any, Optional

from kardia_rl.format.spans import SPAN_TOKENS


def add_span_tokens(tokenizer: Any, model: Optional[Any] = None) -> int:
    """Add the span tokens to `tokenizer` (and resize `model`'s embeddings); returns how many were new."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPAN_TOKENS if t not in vocab]
    added = tokenizer.add_special_tokens({"additional_special_tokens": missing}) if missing else 0
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    for t in SPAN_TOKENS:
        ids = tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"span token {t} encodes to {len(ids)} ids; expected a single special token")
    return added


def span_token_ids(tokenizer: Any) -> dict[str, int]:
    """Map each span token to its id (the tokenizer must already contain them)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPAN_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks span tokens {missing}; call add_span_tokens first")
    return {t: vocab[t] for t in SPAN_TOKENS}
