"""Hardware defaults, below engines, the learner, the judges and the plan so that they all read one definition:
the dtype `auto` stands for, and the KV cache a CPU vLLM engine gets when its size is left at 0."""
from __future__ import annotations

GPU_DTYPE = "bfloat16"  # auto on a GPU: half the memory of fp32 and fp32's exponent range
CPU_DTYPE = "float32"  # auto on CPU: CPU bf16 kernels are slow or missing, and fp32 keeps engine and learner equal
CPU_KV_CACHE_BYTES = 1 << 30  # KV cache of a CPU vLLM engine given 0 (vLLM's default reservation fails on small hosts)


def auto_dtype(dtype: str, gpu: bool) -> str:
    """The dtype name that `dtype` means on this device: `auto` -> bf16 on GPU, fp32 on CPU; others unchanged."""
    return (GPU_DTYPE if gpu else CPU_DTYPE) if dtype == "auto" else dtype
