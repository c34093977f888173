"""A quiet console: vLLM's known-harmless repeated warnings are dropped, everything else still shows, and the
engine log level reaches the Ray actors through their environment."""
from __future__ import annotations

import logging


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _emit_reload_warnings(log) -> list[str]:
    sink = _Collect()
    log.addHandler(sink)
    try:
        log.warning("%s: Failed to load weights", "RotaryEmbedding")
        log.warning("%s: Failed to load weights", "ParallelLMHead")
        log.warning("%s: Failed to load weights", "QKVParallelLinear")  # a real problem: must show
        log.warning("something else entirely")
    finally:
        log.removeHandler(sink)
    return sink.messages


def test_known_harmless_vllm_warnings_are_dropped_and_others_kept():
    from types import SimpleNamespace

    from kardia_rl.engines.vllm_compat import (HARMLESS_WARNINGS, TIED_HEAD_WARNING, _DropHarmless,
                                               drop_known_harmless_warnings, quiet_tied_head_warning)

    name = "vllm.model_executor.model_loader.reload.layerwise"
    log = logging.getLogger(name)
    for f in [f for f in log.filters if isinstance(f, _DropHarmless) and f.prefixes == (TIED_HEAD_WARNING,)]:
        log.removeFilter(f)  # an engine built earlier in this process may have installed it (tied model)
    drop_known_harmless_warnings()
    drop_known_harmless_warnings()  # idempotent: one filter per logger
    assert len(log.filters) == len({id(f) for f in log.filters}) and len(HARMLESS_WARNINGS[name]) == 1
    # an untied head that got no weights means vLLM put the old head back: the warning must show
    assert _emit_reload_warnings(log) == ["ParallelLMHead: Failed to load weights",
                                          "QKVParallelLinear: Failed to load weights", "something else entirely"]
    quiet_tied_head_warning(SimpleNamespace(tie_word_embeddings=False))
    assert "ParallelLMHead: Failed to load weights" in _emit_reload_warnings(log)
    quiet_tied_head_warning(SimpleNamespace(tie_word_embeddings=True))  # a tied head gets nothing: expected
    quiet_tied_head_warning(SimpleNamespace(tie_word_embeddings=True))
    assert _emit_reload_warnings(log) == ["QKVParallelLinear: Failed to load weights", "something else entirely"]
    assert sum(isinstance(f, _DropHarmless) and f.prefixes == (TIED_HEAD_WARNING,) for f in log.filters) == 1


def test_engine_log_level_is_a_checked_key_and_reaches_ray_workers(monkeypatch):
    import pytest

    from kardia_rl.config import load_config
    from kardia_rl.errors import ConfigError

    assert load_config(None, []).logging.engine_log_level == "warning"
    with pytest.raises(ConfigError, match="logging.engine_log_level"):
        load_config(None, ["logging.engine_log_level=loud"])
    import ray

    from kardia_rl.cluster.ray_cluster import init_ray

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(num_cpus=2, log_level="error")
    assert seen["runtime_env"]["env_vars"]["VLLM_LOGGING_LEVEL"] == "ERROR", "actors must inherit the level"
    assert seen["logging_level"] == "ERROR"
