"""Judge backends behind one interface (base.py): `make_judge(cfg.judge)` picks one.

- embedding: EmbeddingJudge, an offline MiniLM proxy (NOT the paper's judge; see embedding.py);
- vllm / openai / hf: RubricJudge (rewards/rubric.py) around a ChatBackend from the sibling module,
  imported lazily so that choosing one backend never imports the others' heavy dependencies.
"""
from __future__ import annotations

import importlib

from kardia_rl.errors import ConfigError
from kardia_rl.rewards.judge.base import (  # noqa: F401
    DIMENSIONS, SCORE_MAX, SCORE_MIN, ChatBackend, JudgeBackend, Judgment, JudgeRequest,
)

JUDGE_BACKENDS = ("embedding", "vllm", "openai", "hf")
_CHAT_BACKENDS = {
    "openai": ("kardia_rl.rewards.judge.openai_backend", "OpenAIChatBackend"),
    "vllm": ("kardia_rl.rewards.judge.vllm_backend", "VLLMChatBackend"),
    "hf": ("kardia_rl.rewards.judge.hf_backend", "HFChatBackend"),
}


def make_chat_backend(cfg_judge) -> ChatBackend:
    """The ChatBackend for an LLM judge backend name (openai | vllm | hf)."""
    if cfg_judge.backend not in _CHAT_BACKENDS:
        raise ConfigError(f"judge.backend: {cfg_judge.backend!r} is not an LLM chat backend; "
                          f"expected one of {sorted(_CHAT_BACKENDS)}")
    module, cls = _CHAT_BACKENDS[cfg_judge.backend]
    return getattr(importlib.import_module(module), cls).from_config(cfg_judge)


def make_judge(cfg_judge, seed: int = 0) -> JudgeBackend:
    """The JudgeBackend configured by `cfg_judge` (the `judge` config section)."""
    backend = cfg_judge.backend
    if backend == "embedding":
        from kardia_rl.rewards.judge.embedding import EmbeddingJudge

        return EmbeddingJudge.from_config(cfg_judge, seed)
    if backend in _CHAT_BACKENDS:
        from kardia_rl.rewards.rubric import RubricJudge

        return RubricJudge.from_config(make_chat_backend(cfg_judge), cfg_judge, seed)
    raise ConfigError(f"judge.backend: {backend!r} is not one of {list(JUDGE_BACKENDS)}")
