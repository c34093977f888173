"""Chat backend on transformers `generate`: small judges without vLLM (and a CPU path with no server).

Batches conversations rendered with the model's chat template, left-padded (decoder-only models continue
from the last position, so padding must sit on the left), at most `max_in_flight` rows per generate call.
All model work runs on one dedicated engine thread (engine_thread.EngineThread): that thread is the lock
that keeps concurrent `complete()` calls from interleaving on the model, it never blocks the event loop,
and it merges calls that arrive while a batch is generating.

Seeded sampling without touching the process-global torch RNG (the judge may share a process with the
learner): at temperature > 0 a logits processor draws each row's next token from the softmax at that
temperature with the row's OWN torch.Generator (seeded with `seed`) and masks every other token, and
generate runs greedily on the masked scores. A row's text thus depends on (conversation, seed) only,
not on the other rows of its batch (up to float rounding from padding). Temperature 0 is plain greedy.
"""
from __future__ import annotations

import collections
import time
from typing import Optional, Sequence

from kardia_rl.errors import ConfigError
from kardia_rl.rewards.judge.base import ChatBackend
from kardia_rl.rewards.judge.engine_thread import (DEFAULT_CHAT_TEMPLATE_KWARGS, EngineThread, complete_on_engine,
                                                   engine_stats)
from kardia_rl.utils.hardware import auto_dtype


class PromptTooLongError(ValueError):
    """The rendered conversation does not fit in the judge model's context."""


class _SeededSampler:
    """Logits processor: sample each row with its own generator, then leave only the sampled token."""

    def __init__(self, generators: list, temperature: float):
        self.generators, self.temperature = generators, temperature

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        picked = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        masked = torch.full_like(scores, float("-inf"))
        return masked.scatter_(1, picked, 0.0)


class HFChatBackend(ChatBackend):
    name = "hf"

    def __init__(self, model_path: str, *, batch_size: int = 16, device: Optional[str] = None, dtype: str = "auto",
                 chat_template_kwargs: Optional[dict] = None, timeout_s: Optional[float] = None):
        if batch_size < 1:
            raise ConfigError(f"judge.max_in_flight (the hf judge batch size) must be >= 1, got {batch_size!r}")
        self.model_path, self.batch_size = model_path, int(batch_size)
        self.timeout_s = timeout_s  # per attempt (one engine batch); None = unbounded
        self.chat_template_kwargs = dict(DEFAULT_CHAT_TEMPLATE_KWARGS if chat_template_kwargs is None
                                         else chat_template_kwargs)
        self.stats = engine_stats()
        self._engine = EngineThread("kardia-hf-judge")
        try:
            start = time.monotonic()
            self._engine.call(self._load, device, dtype)
            self.startup_s = time.monotonic() - start
        except BaseException:
            self._engine.close()
            raise

    @classmethod
    def from_config(cls, cfg, *, timeout_s: Optional[float] = None) -> "HFChatBackend":
        """Build from JudgeConfig: cfg.model is a local directory or hub id; rows per batch = max_in_flight."""
        return cls(cfg.model, batch_size=cfg.max_in_flight, device=cfg.device or None, dtype=cfg.dtype,
                   chat_template_kwargs=cfg.chat_template_kwargs, timeout_s=timeout_s)

    def __repr__(self) -> str:
        return f"HFChatBackend(model={self.model_path!r}, batch_size={self.batch_size}, device={self.device!r})"

    async def complete(self, conversations: Sequence[list[dict]], *, temperature: float, max_tokens: int,
                       seed: Optional[int] = None) -> list:
        return await complete_on_engine(self._engine, self._generate, self.stats, conversations,
                                        temperature=temperature, max_tokens=max_tokens, seed=seed,
                                        timeout_s=self.timeout_s)

    async def close(self) -> None:
        if self._engine.alive:
            await self._engine.acall(self._unload)
        self._engine.close()

    # ------------------------------------------------------------------ engine thread only
    def _load(self, device: Optional[str], dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, auto_dtype(dtype, self.device.startswith("cuda")), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ConfigError(f"judge.dtype must be auto | float32 | bfloat16 | float16, got {dtype!r}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype).to(self.device)
        except OSError as e:
            raise ConfigError(f"judge.model={self.model_path!r} could not be loaded for the hf judge: {e}") from e
        self.model.eval()
        self.tokenizer.padding_side = "left"
        gen = self.model.generation_config
        self.eos_ids = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(self.eos_ids if isinstance(self.eos_ids, (list, tuple)) else [self.eos_ids])
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.context_len = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30

    def _unload(self) -> None:
        self.model = None

    def _generate(self, items: list) -> list:
        """Items are (conversation, temperature, max_tokens, seed); returns texts or Exceptions, aligned."""
        results: list = [None] * len(items)
        prompts = []
        for i, (conv, *_rest) in enumerate(items):
            try:
                text = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False,
                                                          **self.chat_template_kwargs)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            except Exception as e:  # noqa: BLE001 - a malformed conversation fails only itself
                results[i] = e
                continue
            if len(ids) >= self.context_len:
                results[i] = PromptTooLongError(f"judge prompt has {len(ids)} tokens; {self.model_path} takes "
                                                f"at most {self.context_len}")
                continue
            prompts.append((i, ids))
        # Rows of one generate call share temperature and max_tokens; sort by length to limit padding.
        groups = collections.defaultdict(list)
        for i, ids in prompts:
            groups[(items[i][1], items[i][2])].append((i, ids))
        for (temperature, max_tokens), rows in groups.items():
            rows.sort(key=lambda r: len(r[1]))
            for k in range(0, len(rows), self.batch_size):
                chunk = rows[k:k + self.batch_size]
                texts = self._generate_chunk([ids for _, ids in chunk], [items[i][3] for i, _ in chunk],
                                             temperature, max_tokens)
                for (i, _), text in zip(chunk, texts):
                    results[i] = text
        return results

    def _generate_chunk(self, id_lists: list, seeds: list, temperature: float, max_tokens: int) -> list[str]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        batch = self.tokenizer.pad({"input_ids": id_lists}, padding=True, return_tensors="pt").to(self.device)
        width = batch["input_ids"].shape[1]
        max_new = max(1, min(max_tokens, self.context_len - width))
        processors = LogitsProcessorList()
        if temperature > 0:
            generators = []
            for s in seeds:
                g = torch.Generator(device=self.device)
                if s is None:
                    g.seed()
                else:
                    g.manual_seed(int(s))
                generators.append(g)
            processors.append(_SeededSampler(generators, temperature))
        gen_cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(self.eos_ids),
                                   pad_token_id=self.tokenizer.pad_token_id)
        start = time.monotonic()
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=gen_cfg, logits_processor=processors)
        self.stats["generate_s"] += time.monotonic() - start
        self.stats["batches"] += 1
        texts = []
        for row, ids in zip(out[:, width:].tolist(), id_lists):
            n = next((j + 1 for j, t in enumerate(row) if t in self.eos_ids), len(row))
            self.stats["prompt_tokens"] += len(ids)
            self.stats["generated_tokens"] += n
            texts.append(self.tokenizer.decode(row[:n], skip_special_tokens=True))
        return texts
