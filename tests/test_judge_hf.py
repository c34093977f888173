"""The `hf` chat backend (transformers generate) on the tiny local model."""
from __future__ import annotations

import asyncio

import pytest
import torch

from kardia_rl.config.schema import JudgeConfig
from kardia_rl.errors import ConfigError
from kardia_rl.rewards.judge.engine_thread import tokens_per_s
from kardia_rl.rewards.judge.hf_backend import HFChatBackend, PromptTooLongError


def convs(n: int, tag: str = "") -> list[list[dict]]:
    return [[{"role": "system", "content": "You are a strict judge. Answer with JSON scores."},
             {"role": "user", "content": f"Rate this reply {tag}{i}: I am sorry you feel lonely. " * (1 + i % 3)}]
            for i in range(n)]


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    b = HFChatBackend.from_config(JudgeConfig(backend="hf", model=tiny_model_dir, max_in_flight=4))
    print(f"\nhf judge start-up: {b.startup_s:.1f} s")
    yield b
    asyncio.run(b.close())


def complete(b, cs, **kw):
    kw.setdefault("temperature", 0.8)
    kw.setdefault("max_tokens", 16)
    return asyncio.run(b.complete(cs, **kw))


def test_strings_for_all_with_more_rows_than_a_batch(hf):
    batches = hf.stats["batches"]
    out = complete(hf, convs(9), seed=1)
    assert len(out) == 9 and all(isinstance(o, str) for o in out)
    assert hf.stats["batches"] - batches == 3  # max_in_flight=4 rows per generate call
    assert 0 < hf.stats["generated_tokens"] <= 9 * 16 and tokens_per_s(hf.stats) > 0


def test_seeded_sampling_is_deterministic_and_independent_of_the_batch(hf):
    cs = convs(6, "det")
    a = complete(hf, cs, seed=21)
    assert complete(hf, cs, seed=21) == a
    assert complete(hf, cs[::-1], seed=21)[::-1] == a  # other rows and padding do not change a row's sample
    assert complete(hf, cs[2:3], seed=21) == a[2:3]
    assert complete(hf, cs, seed=22) != a


def test_global_rng_is_not_touched(hf):
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    complete(hf, convs(2), seed=3)
    assert torch.equal(torch.rand(4), expected)


def test_greedy_matches_a_plain_transformers_generate(hf, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    conv = convs(1, "greedy")[0]
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = model.generate(**ids, max_new_tokens=16, do_sample=False)
    expected = tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert complete(hf, [conv], temperature=0.0, max_tokens=16) == [expected]


def test_concurrent_calls_do_not_interleave_and_are_merged(hf):
    cs = convs(4, "conc")
    alone = complete(hf, cs, seed=9)
    batches = hf.stats["batches"]

    async def many():
        return await asyncio.gather(*(hf.complete([c], temperature=0.8, max_tokens=16, seed=9) for c in cs))
    out = asyncio.run(many())
    assert [o[0] for o in out] == alone
    assert hf.stats["batches"] - batches < len(cs)


def test_too_long_prompt_fails_alone(hf):
    cs = convs(2, "long")
    out = complete(hf, [cs[0], [{"role": "user", "content": "word " * 3000}], cs[1]], seed=4)
    assert isinstance(out[1], PromptTooLongError)
    assert out[0::2] == complete(hf, cs, seed=4)


def test_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="judge.model"):
        HFChatBackend(str(tmp_path / "no-such-model"))


def test_engine_thread_merges_pending_calls_and_isolates_failures():
    import time

    from kardia_rl.rewards.judge.engine_thread import EngineThread

    sizes = []

    def batch_fn(items):
        sizes.append(len(items))
        time.sleep(0.05)  # while this "generates", the other submissions queue up
        if "bad" in items:
            raise ValueError("bad item in batch")
        return [f"out:{x}" for x in items]

    eng = EngineThread("test-engine")

    async def go():
        merged = await asyncio.gather(*(eng.run_batch(batch_fn, [f"x{i}", f"y{i}"]) for i in range(5)))
        first_pass = list(sizes)
        mixed = await asyncio.gather(eng.run_batch(batch_fn, ["bad", "z"]), eng.run_batch(batch_fn, ["w"]))
        return merged, first_pass, mixed
    try:
        merged, first_pass, mixed = asyncio.run(go())
    finally:
        eng.close()
    assert merged == [[f"out:x{i}", f"out:y{i}"] for i in range(5)]
    # The first submission may start alone; the four queued behind it run as one batch.
    assert sum(first_pass) == 10 and len(first_pass) <= 2
    assert isinstance(mixed[0][0], ValueError) and mixed[0][1] == "out:z" and mixed[1] == ["out:w"]
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(eng.run_batch(batch_fn, ["late"]))
