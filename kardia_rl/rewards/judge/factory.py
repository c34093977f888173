"""The judge factory: `make_judge(cfg.judge)` builds the configured JudgeBackend.

This is the one place that reads the judge's timeout and retry keys: it builds a `RetryPolicy` and hands
each layer its part (base.py says which): the chat backend its per-attempt timeout, RubricJudge the retry
budget and backoff. The pool (cluster/judge_pool.py) takes its attempts from the same policy.

Backends are imported lazily so that choosing one never imports the others' heavy dependencies.
"""
from __future__ import annotations

import importlib
from typing import Optional

from kardia_rl.config.schema import JUDGE_BACKENDS
from kardia_rl.errors import ConfigError
from kardia_rl.rewards.judge.base import ChatBackend, JudgeBackend, RetryPolicy

_CHAT_BACKENDS = {
    "openai": ("kardia_rl.rewards.judge.openai_backend", "OpenAIChatBackend"),
    "vllm": ("kardia_rl.rewards.judge.vllm_backend", "VLLMChatBackend"),
    "hf": ("kardia_rl.rewards.judge.hf_backend", "HFChatBackend"),
}
# Backends that load a model into the process that builds them (openai only sends HTTP requests).
MODEL_BACKENDS = ("vllm", "hf", "embedding")


def _audit(backend: str, model: str) -> None:
    """The placement audit (utils/construction_log.py): where a judge model is loaded."""
    from kardia_rl.utils.construction_log import record

    record("construct", f"judge:{backend}", model)


def make_chat_backend(cfg_judge, policy: Optional[RetryPolicy] = None) -> ChatBackend:
    """The ChatBackend for an LLM judge backend name (openai | vllm | hf), with the policy's attempt timeout."""
    if cfg_judge.backend not in _CHAT_BACKENDS:
        raise ConfigError(f"judge.backend: {cfg_judge.backend!r} is not an LLM chat backend; "
                          f"expected one of {sorted(_CHAT_BACKENDS)}")
    policy = policy or RetryPolicy.from_config(cfg_judge)
    if cfg_judge.backend in MODEL_BACKENDS:
        _audit(cfg_judge.backend, cfg_judge.model)
    module, cls = _CHAT_BACKENDS[cfg_judge.backend]
    return getattr(importlib.import_module(module), cls).from_config(cfg_judge, timeout_s=policy.timeout_s)


def make_judge(cfg_judge, seed: int = 0) -> JudgeBackend:
    """The JudgeBackend configured by `cfg_judge` (the `judge` config section)."""
    backend = cfg_judge.backend
    if backend == "embedding":
        from kardia_rl.rewards.judge.embedding import EmbeddingJudge

        _audit(backend, "all-MiniLM-L6-v2")

        return EmbeddingJudge.from_config(cfg_judge, seed)
    if backend in _CHAT_BACKENDS:
        from kardia_rl.rewards.judge.rubric import RubricJudge

        policy = RetryPolicy.from_config(cfg_judge)
        return RubricJudge.from_config(make_chat_backend(cfg_judge, policy), cfg_judge, policy, seed)
    raise ConfigError(f"judge.backend: {backend!r} is not one of {list(JUDGE_BACKENDS)}")
