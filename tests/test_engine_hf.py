"""The transformers fallback engine, held to the same contract as the vLLM engine (tests/test_engine_vllm.py)."""
from __future__ import annotations

import math

import pytest
import torch

from kardia_rl.data.schema import expand_turns
from kardia_rl.data.validate import load_dialogues
from kardia_rl.engines import make_engine
from kardia_rl.engines.base import RESPONSE_END, request_seed, stop_token_ids
from kardia_rl.engines.verify import ReferenceScorer, max_abs_diff
from kardia_rl.errors import KardiaError
from kardia_rl.format.prompt import build_messages, build_prompt

TOL = 1e-3
N = 8
MAX_NEW = 24


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread for this module: the 1M-parameter model gains nothing from two, and on a shared
    2-core machine OpenMP threads spin-waiting for a busy core made these tests 3-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = make_engine("hf", tiny_model_dir, seed=0, dtype="float32", max_model_len=512)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return ReferenceScorer(tiny_model_dir)


@pytest.fixture(scope="module")
def base_state(reference):
    return {k: v.clone() for k, v in reference.model.state_dict().items()}


@pytest.fixture
def restore_weights(engine, reference, base_state):
    yield
    engine.load_state_dict(base_state)
    reference.load_state_dict(base_state)


@pytest.fixture(scope="module")
def prompts(engine):
    """Three prompts of different lengths from the bundled test split (exercises left padding)."""
    tok = engine.tokenizer
    turns = [t for d in load_dialogues("builtin:sample/test")[:3] for t in expand_turns(d)[:1]]
    out = [tok.encode(build_prompt(tok, build_messages(t.person, t.situation, t.history, system=t.system,
                                                       max_history_turns=1)), add_special_tokens=False)
           for t in turns]
    assert len({len(p) for p in out}) > 1
    return out


def perturbed(state: dict, seed: int, scale: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items() if k != "lm_head.weight"}


def test_stop_set(engine, tiny_model_dir):
    tok = engine.tokenizer
    expected = {tok.convert_tokens_to_ids(t) for t in (RESPONSE_END, "<|im_end|>", "<|endoftext|>")}
    assert set(stop_token_ids(tok, tiny_model_dir)) == expected == set(engine.stop_ids)


def test_n_samples_with_transformers_logprobs(engine, reference, prompts):
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (0.7, 0.9)):
        outs = engine.generate(prompts, N, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW, seed=3)
        assert len(outs) == len(prompts) and all(len(g) == N for g in outs)
        for group in outs:
            assert len({tuple(c.token_ids) for c in group}) > 1
            for c in group:
                assert len(c.logprobs) == len(c.token_ids) >= 1
                assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
                assert c.finish_reason in ("stop", "length")
        diff = reference.completions_max_diff(prompts, outs, temperature, top_p)
        assert diff < TOL, (temperature, top_p, diff)
    c = outs[0][0]
    assert max_abs_diff(reference.completion_logprobs(prompts[0], c.token_ids, 1.0), c.logprobs) > 0.05


def test_seeded_determinism_leaves_global_rng(engine, prompts):
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = engine.generate(prompts, N, seed=11, **kw)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is not consumed
    b = engine.generate(prompts, N, seed=11, **kw)
    c = engine.generate(prompts, N, seed=12, **kw)
    ids = lambda outs: [[x.token_ids for x in g] for g in outs]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert request_seed(11, 0) != request_seed(12, 0) != request_seed(11, 1)


def test_chunking_keeps_every_prompt(tiny_model_dir, prompts):
    small = make_engine("hf", tiny_model_dir, dtype="float32", max_model_len=512)
    small.max_batch_sequences = 4  # 2 samples x 2 prompts per generate call -> 2 chunks for 3 prompts
    outs = small.generate(prompts, 2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=0)
    assert [len(g) for g in outs] == [2, 2, 2]
    small.shutdown()


def test_greedy(engine, reference, prompts):
    outs = engine.generate(prompts, 2, temperature=0.7, top_p=1.0, max_new_tokens=MAX_NEW, seed=0, greedy=True)
    for prompt, (a, b) in zip(prompts, outs):
        assert a.token_ids == b.token_ids
        assert max_abs_diff(reference.completion_logprobs(prompt, a.token_ids, 1.0), a.logprobs) < TOL
        logits = reference._logits(list(prompt) + a.token_ids)[len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == a.token_ids


@pytest.mark.parametrize("stop_token", [RESPONSE_END, "<|im_end|>"])
def test_stop_tokens(engine, reference, prompts, base_state, restore_weights, stop_token):
    """Zeroed block outputs + e_stop = 40 * e_last make the stop token the near-certain first token
    (see the same construction in test_engine_vllm.py)."""
    stop_id = engine.tokenizer.convert_tokens_to_ids(stop_token)
    state = {k: (torch.zeros_like(v) if k.endswith(("o_proj.weight", "down_proj.weight")) else v.clone())
             for k, v in base_state.items() if k != "lm_head.weight"}
    state["model.embed_tokens.weight"][stop_id] = 40.0 * state["model.embed_tokens.weight"][prompts[0][-1]]
    engine.load_state_dict(state)
    reference.load_state_dict(state)
    outs = engine.generate(prompts, N, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=5)
    for group in outs:
        for c in group:
            assert c.token_ids == [stop_id] and c.finish_reason == "stop"
            # an EOS is not part of the answer; <|response_end|> closes the response span and stays
            assert c.text == (RESPONSE_END if stop_token == RESPONSE_END else "")
    assert reference.completions_max_diff(prompts, outs, 1.0) < TOL


def test_length_finish(engine, prompts):
    outs = engine.generate(prompts, 2, temperature=1.0, top_p=1.0, max_new_tokens=5, min_new_tokens=5, seed=1)
    for group in outs:
        for c in group:
            assert len(c.token_ids) == 5 and c.finish_reason == "length"
            assert not set(c.token_ids) & set(engine.stop_ids)
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=False)


def test_three_reloads_verified(engine, reference, prompts, base_state, restore_weights):
    probe = prompts[0][:96]
    assert engine.verify(probe) < 1e-5
    state = base_state
    for round_ in range(3):
        old_ref = reference.sequence_logprobs(probe)
        state = perturbed(state, seed=100 + round_, scale=0.05)
        engine.load_state_dict(state)
        assert engine.verify(probe) < 1e-5  # same fp32 weights, same code: ~0
        assert max_abs_diff(old_ref, engine.probe_logprobs(probe)) > 0.1
        reference.load_state_dict(state)
        outs = engine.generate(prompts[:2], 2, temperature=0.7, top_p=1.0, max_new_tokens=8, seed=round_)
        assert reference.completions_max_diff(prompts[:2], outs, 0.7) < TOL


def test_bad_input(engine, prompts, base_state, tiny_model_dir, tmp_path):
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0)
    with pytest.raises(KardiaError, match="prompt 1"):
        engine.generate([prompts[0], []], 2, **kw)
    with pytest.raises(KardiaError, match="max_model_len"):
        engine.generate([prompts[0] * 3], 2, **kw)
    with pytest.raises(KardiaError, match="top_p"):
        engine.generate(prompts, 2, **{**kw, "top_p": 0.0})
    with pytest.raises(KardiaError, match="n \\(samples"):
        engine.generate(prompts, 0, **kw)
    with pytest.raises(KardiaError, match="missing"):
        engine.load_state_dict({k: v for k, v in base_state.items() if "norm" not in k})
    with pytest.raises(KardiaError, match="shape"):
        engine.load_state_dict({**base_state, "model.norm.weight": torch.ones(3)})
    with pytest.raises(KardiaError, match="not a model directory"):
        make_engine("hf", str(tmp_path))
    with pytest.raises(KardiaError, match="choose one of"):
        make_engine("onnx", tiny_model_dir)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight",
                                  "model.norm.weight"])
def test_verify_catches_one_wrong_tensor(engine, prompts, base_state, restore_weights, name):
    from engine_checks import assert_verify_catches_one_wrong_tensor

    assert_verify_catches_one_wrong_tensor(engine, prompts[0][:96], base_state, name)
