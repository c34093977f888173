"""The one generation interface shared by the vLLM engine and the transformers fallback.

Contract (both engines honour it, and the tests check it against a plain transformers forward):
- prompts go in as token ids (the caller renders the chat template once, so prompt tokens are identical
  for generation, the learner and the reference model);
- `generate` returns, per prompt, `n` completions; each carries the response token ids INCLUDING the stop
  token when one was produced (the learner must train on the stop token, or the policy never learns to
  stop), the text decoded with special tokens kept (span tags visible) but without the stop token, the
  per-token log-probs of the distribution that was actually sampled (after temperature and top-p; these
  are the "old" log-probs of the PPO ratio), and why it stopped;
- greedy decoding uses no temperature, so its log-probs are the raw (temperature 1) ones;
- the stop set is the response end span token plus every EOS id of the tokenizer and generation config;
- the same seed gives the same samples.
"""
from __future__ import annotations

import json
import numbers
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from kardia_rl.config.schema import MODEL_DTYPES
from kardia_rl.errors import KardiaError
from kardia_rl.utils.hardware import auto_dtype
from kardia_rl.utils.seeds import derive_seed

RESPONSE_END = "<|response_end|>"
FINISH_REASONS = ("stop", "length")
DTYPES = MODEL_DTYPES + ("float16",)  # engines also take a checkpoint's own fp16 (judge models, tests)


@dataclass
class Completion:
    token_ids: list[int]  # response tokens only, including the stop token if one was produced
    text: str  # decoded with special tokens kept; an EOS stop token is dropped, <|response_end|> is kept
    logprobs: list[float]  # one per token in token_ids, of the sampling distribution (after temperature/top-p)
    finish_reason: str  # "stop" | "length"


class GenerationEngine(ABC):
    """Prompts (token ids) -> N sampled completions, plus live weight updates and their verification."""

    model_path: str
    tokenizer: Any
    stop_ids: list[int]

    @abstractmethod
    def generate(self, prompts: list[list[int]], n: int, *, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, greedy: bool = False,
                 min_new_tokens: int = 0) -> list[list[Completion]]:
        """Sample `n` completions per prompt. `min_new_tokens` forbids stopping earlier (benchmarks)."""

    @abstractmethod
    def load_state_dict(self, state_dict: dict) -> None:
        """Replace the engine's weights with `state_dict` (checkpoint names, full set of tensors)."""

    @abstractmethod
    def probe_logprobs(self, probe_ids: list[int]) -> list[float]:
        """Temperature-1 log-prob of each probe token given the ones before it (len(probe_ids) - 1 values)."""

    def verify(self, probe_ids: list[int]) -> float:
        """Max |engine - transformers fp32 forward| log-prob over the probe, both on the current weights.

        The reference (a CPU fp32 transformers copy of the model) is built on first use and follows every
        `load_state_dict`, so a stale engine (weights not really synced) shows up as a large value. For
        models too large to keep a CPU copy, build the engine with verify_reference=False and compare
        `probe_logprobs` with the learner's own log-probs on the probe.
        """
        from kardia_rl.engines.verify import max_abs_diff

        if not getattr(self, "verify_reference", True):
            raise KardiaError("verify() needs the engine built with verify_reference=True (a CPU fp32 copy of "
                              "the model); compare probe_logprobs() with the learner's log-probs instead")
        check_probe(probe_ids, len(self.tokenizer))
        return max_abs_diff(self.probe_logprobs(probe_ids), self.reference().sequence_logprobs(probe_ids))

    # Can this engine join the learner's weight-transfer group (vLLM's native API, `weight_transfer`)?
    # Engines that cannot (the transformers engine) are updated through `load_state_dict` instead.
    collective_sync = False

    def weight_transfer(self, phase: str, payload: Any = None) -> None:
        """One phase of a collective weight sync: init | start | update | finish (see vllm_weight_transfer)."""
        raise KardiaError(f"{type(self).__name__} cannot join a collective weight sync; use load_state_dict")

    @abstractmethod
    def shutdown(self) -> None:
        """Release the engine (memory, threads); the object is unusable afterwards."""

    # -- shared helpers -------------------------------------------------------------------------------
    _reference: Any = None

    def reference(self):
        """The transformers fp32 CPU model the engine is verified against (created lazily, kept in sync)."""
        if self._reference is None:
            from kardia_rl.engines.verify import ReferenceScorer

            self._reference = ReferenceScorer(self.model_path)
        return self._reference

    def _sync_reference(self, state_dict: dict) -> None:
        """Mirror a weight update into the reference (built now if needed: a later verify() must compare
        against THESE weights, not the ones on disk). Engines built with verify_reference=False skip it."""
        if getattr(self, "verify_reference", True):
            self.reference().load_state_dict(state_dict)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of a completion. A final EOS is dropped (it is not part of the answer), but a final
        <|response_end|> is kept: it closes the response span, and without it every answer that stopped
        there would parse as malformed (format reward 0)."""
        body = list(token_ids)
        if body and body[-1] in self.stop_ids and body[-1] != self.tokenizer.convert_tokens_to_ids(RESPONSE_END):
            body = body[:-1]
        return self.tokenizer.decode(body, skip_special_tokens=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def stop_token_ids(tokenizer: Any, model_path: Optional[str] = None) -> list[int]:
    """The response end span token (when the vocabulary has it) plus every EOS id the model declares.

    Both engines use this exact set, so they stop at the same places; EOS ids come from the tokenizer and
    from generation_config.json (Qwen2.5 lists both <|im_end|> and <|endoftext|> there).
    """
    ids: list[int] = []
    vocab = tokenizer.get_vocab()
    if RESPONSE_END in vocab:
        ids.append(vocab[RESPONSE_END])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_path = os.path.join(model_path, "generation_config.json") if model_path else None
    if gen_path and os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.extend([eos] if isinstance(eos, int) else list(eos or []))
    if not ids:
        raise KardiaError(f"{model_path}: tokenizer has neither {RESPONSE_END} nor an EOS token to stop at")
    return sorted(set(int(i) for i in ids))


def request_seed(seed: int, index: int) -> int:
    """A well-mixed 56-bit seed per (call seed, prompt index).

    vLLM gives the j-th of n samples `seed + j`, so plain `seed + index` would reuse streams across prompts
    and across consecutive call seeds; hashing keeps all streams distinct with overwhelming probability.
    """
    return derive_seed(int(seed), int(index), scheme="colon56")


def resolve_dtype(dtype: str, on_gpu: bool) -> str:
    if dtype not in DTYPES:
        raise KardiaError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return auto_dtype(dtype, on_gpu)


def check_probe(probe_ids: Sequence[int], vocab_size: int) -> None:
    if len(probe_ids) < 2:
        raise KardiaError(f"verify probe needs at least 2 tokens, got {len(probe_ids)}")
    bad = [t for t in probe_ids if not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size]
    if bad:
        raise KardiaError(f"verify probe has token ids outside [0, {vocab_size}): {bad[:5]}")


def check_generate_args(prompts: Sequence[Sequence[int]], n: int, *, temperature: float, top_p: float,
                        max_new_tokens: int, greedy: bool, min_new_tokens: int, vocab_size: int,
                        max_model_len: int) -> None:
    """Reject bad requests with messages that name the argument (and the prompt index) before any work."""
    if not isinstance(prompts, (list, tuple)):
        raise KardiaError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if not isinstance(n, int) or n < 1:
        raise KardiaError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KardiaError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise KardiaError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    if not greedy and not temperature > 0:
        raise KardiaError(f"temperature must be > 0 for sampling (use greedy=True for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise KardiaError(f"top_p must be in (0, 1], got {top_p}")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p:
            raise KardiaError(f"prompt {i}: expected a non-empty list of token ids")
        bad = [t for t in p if not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size]
        if bad:
            raise KardiaError(f"prompt {i}: token ids outside [0, {vocab_size}): {bad[:5]}")
        if len(p) + max_new_tokens > max_model_len:
            raise KardiaError(f"prompt {i}: {len(p)} prompt tokens + max_new_tokens {max_new_tokens} exceed "
                              f"max_model_len {max_model_len}; shorten the history or raise max_model_len")
