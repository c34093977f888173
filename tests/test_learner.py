"""DeepSpeed learner on CPU (gloo): GRPO updates at world size 1 and 2, NaN-skip, HF export, checkpoints, LoRA.

Rollouts are constructed directly (no engines): for each prompt a group of 8 responses of which every other
one starts with one chosen token X and gets reward 1, so rewards vary within every group and a correct
update must raise p(X | prompt). Runtime about 60-90 s on 2 busy cores (two spawned ranks included).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from kardia_rl.algo import group_advantages
from kardia_rl.config import load_config
from kardia_rl.learner import batching as B
from kardia_rl.learner.distributed import run_local_ranks

G = 8
PROMPTS = ["Hello there, how are you?", "I feel sad today.", "My dog ran away this morning.",
           "I got the job!"]


def make_cfg(*overrides):
    base = ["learner.zero_stage=2", "learner.lr=1e-3", "learner.micro_batch_size=4", "rollout.temperature=1.0",
            "algo.kl_beta=0.0", "model.max_new_tokens=8"]
    return load_config("conf/tiny.yaml", base + list(overrides))


def rollout(tokenizer, n_prompts: int = 2, seed: int = 0):
    """(batch with advantages, probe batch scoring X after each prompt, X)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:n_prompts]]
    X = tokenizer.convert_tokens_to_ids("<|response_begin|>")
    vocab = len(tokenizer)
    ps, rs, rewards = [], [], []
    for p in prompts:
        for i in range(G):
            n = 3 + int(torch.randint(0, 5, (1,), generator=g))  # ragged lengths exercise the padding
            r = torch.randint(10, vocab, (n,), generator=g).tolist()
            r = [t if t != X else X + 1 for t in r]
            if i % 2 == 0:
                r[0] = X
            ps.append(p)
            rs.append(r)
            rewards.append(1.0 if r[0] == X else 0.0)
    adv = group_advantages(torch.tensor(rewards), G).advantages
    batch = B.collate_rollout(ps, rs, tokenizer.pad_token_id, advantages=adv)
    probe = B.collate_rollout(prompts, [[X]] * len(prompts), tokenizer.pad_token_id)
    return batch, probe, X


def weights(learner) -> dict:
    return {k: v.clone() for k, v in learner.hf_state_dict().items()}


def max_change(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def finite_metrics(m: dict) -> bool:
    return all(math.isfinite(v) for v in m.values())


# --- pure batching ---------------------------------------------------------------------------------------
def test_collate_and_micro_batches_keep_layout():
    batch = B.collate_rollout([[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]], pad_id=0,
                              old_logprobs=[[-1.0, -2.0], [-1.0, -1.0, -1.0, -1.0]], advantages=[1.0, -1.0])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10, 0, 0], [0, 0, 8, 11, 12, 13, 14]]
    assert batch["position_ids"][1].tolist()[2:] == [0, 1, 2, 3, 4]
    assert batch["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    mbs = B.rollout_micro_batches(batch, micro_batch_size=1)
    assert sorted(int(mb["_rows"][0]) for mb in mbs) == [0, 1]
    first = next(mb for mb in mbs if int(mb["_rows"][0]) == 0)  # trimmed: prompt 3 wide, response 2 wide
    assert first["input_ids"].tolist() == [[5, 6, 7, 9, 10]] and first["old_logprobs"].tolist() == [[-1.0, -2.0]]
    assert B.chunk_rows([10, 10, 10, 10], max_rows=4, max_tokens=25) == [[0, 1], [2, 3]]


def test_logprobs_ignore_left_padding(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from kardia_rl.learner.logprobs import response_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    alone = B.collate_rollout([[5, 6, 7, 8, 9]], [[20, 21, 22]], 0)
    padded = B.collate_rollout([[5, 6, 7, 8, 9], [30]], [[20, 21, 22], [40]], 0)
    with torch.no_grad():
        a = response_logprobs(model, alone)[0]
        b = response_logprobs(model, padded)[0]
        ids = alone["input_ids"]
        full = torch.log_softmax(model(ids).logits[0, 4:7], -1).gather(-1, ids[0, 5:8, None]).squeeze(-1)
    assert torch.allclose(a[0], full, atol=1e-5)
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert float(b[1, 1:].abs().sum()) == 0.0  # padding is exactly 0


# --- world size 1 ---------------------------------------------------------------------------------------
@pytest.mark.ray
def test_grpo_updates_raise_rewarded_token_ws1(tiny_model_dir):
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

    learner = DeepSpeedLearner(make_cfg(), tiny_model_dir)
    batch, probe, _ = rollout(learner.tokenizer)
    p0 = learner.compute_logprobs(probe)[:, 0].exp()
    w0 = weights(learner)
    for _ in range(3):
        m = learner.train_step(batch)
        assert finite_metrics(m) and m["train/step_applied"] == 1.0 and m["train/tokens"] > 0
    p1 = learner.compute_logprobs(probe)[:, 0].exp()
    assert max_change(w0, weights(learner)) > 0
    assert bool((p1 > 1.5 * p0).all()), (p0, p1)


@pytest.mark.ray
def test_nan_loss_skips_step_then_training_continues(tiny_model_dir):
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

    learner = DeepSpeedLearner(make_cfg(), tiny_model_dir)
    batch, _, _ = rollout(learner.tokenizer)
    bad = dict(batch, advantages=batch["advantages"].clone())
    bad["advantages"][3] = float("nan")
    w0 = weights(learner)
    m = learner.train_step(bad)
    assert m["train/step_applied"] == 0.0 and m["train/skipped_steps"] == 1.0
    assert max_change(w0, weights(learner)) == 0.0
    m = learner.train_step(batch)
    assert m["train/step_applied"] == 1.0 and m["train/skipped_steps"] == 1.0 and finite_metrics(m)
    assert max_change(w0, weights(learner)) > 0


@pytest.mark.ray
def test_zero0_guard_skips_non_finite_gradients(tiny_model_dir):
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

    learner = DeepSpeedLearner(make_cfg("learner.zero_stage=0"), tiny_model_dir)
    batch, _, _ = rollout(learner.tokenizer)
    bad = dict(batch, advantages=batch["advantages"].clone())
    bad["advantages"][0] = float("inf")
    w0 = weights(learner)
    assert learner.train_step(bad)["train/step_applied"] == 0.0
    assert max_change(w0, weights(learner)) == 0.0
    m = learner.train_step(batch)
    assert m["train/step_applied"] == 1.0 and 0 < m["train/grad_norm"] < float("inf")


def test_streamed_export_writes_each_shard_as_it_completes_and_loads_back(tiny_model_dir, tmp_path, monkeypatch):
    """write_hf_folder (an export's writer on learner rank 0): with a 256 KiB shard limit the tiny model goes to
    several shards plus an index, each shard saved the moment its last tensor arrived (never the whole model at
    once), and transformers loads the folder back to the same logits."""
    import json

    import safetensors.torch
    from transformers import AutoModelForCausalLM

    from kardia_rl.learner import export

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    meta = export.hf_metadata(model)
    held, saved = [], []
    real_save = safetensors.torch.save_file

    def counting_save(tensors, path, metadata=None):
        saved.append((os.path.basename(path), len(tensors), held[-1]))
        real_save(tensors, path, metadata=metadata)

    def stream():
        for i, item in enumerate(export.iter_hf_tensors(model)):
            held.append(i + 1)  # tensors produced so far
            yield item

    monkeypatch.setattr(safetensors.torch, "save_file", counting_save)
    out = export.write_hf_folder(stream(), meta, str(tmp_path / "out"), model.config, max_shard_bytes=256 << 10)
    where, counts = export.shard_plan(meta, 256 << 10)
    assert len(saved) == len(counts) > 2 and [n for _, n, _ in saved] == counts
    assert [h for _, _, h in saved] == [sum(counts[:i + 1]) for i in range(len(counts))]  # written as they complete
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {m[0] for m in meta} and len(set(index["weight_map"].values())) == len(counts)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        back = AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.ray
def test_hf_state_dict_and_save_pretrained_round_trip(tiny_model_dir, tmp_path, stage):
    from transformers import AutoModelForCausalLM

    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

    # stage 3 also exercises the partitioned reference engine (kl_beta > 0) and gathered export
    learner = DeepSpeedLearner(make_cfg(f"learner.zero_stage={stage}", f"algo.kl_beta={0.01 * (stage == 3)}"),
                               tiny_model_dir)
    batch, probe, _ = rollout(learner.tokenizer)
    m = learner.train_step(batch)
    assert finite_metrics(m) and m["train/step_applied"] == 1.0
    sd = learner.hf_state_dict()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to embed_tokens
    fresh.tie_weights()
    ids = probe["input_ids"][:1]
    with torch.no_grad():
        want = learner.module(input_ids=ids).logits
        assert torch.allclose(fresh(input_ids=ids).logits, want, atol=1e-5)
        saved = AutoModelForCausalLM.from_pretrained(learner.save_pretrained(str(tmp_path / "out"))).eval()
        assert torch.allclose(saved(input_ids=ids).logits, want, atol=1e-5)
        before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert not torch.allclose(before(input_ids=ids).logits, want, atol=1e-5)
    assert (tmp_path / "out" / "tokenizer.json").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.ray
def test_checkpoint_round_trip_resumes_exactly(tiny_model_dir, tmp_path):
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

    cfg = make_cfg("learner.warmup_steps=3")
    a = DeepSpeedLearner(cfg, tiny_model_dir)
    batch, _, _ = rollout(a.tokenizer)
    a.train_step(batch)
    a.save_checkpoint(str(tmp_path / "ckpt"), client_state={"data_pos": 7})
    m_a = a.train_step(batch)
    w_a = weights(a)
    b = DeepSpeedLearner(cfg, tiny_model_dir)
    state = b.load_checkpoint(str(tmp_path / "ckpt"))
    assert state["data_pos"] == 7 and b.global_step == 1
    m_b = b.train_step(batch)
    assert m_b["train/lr"] == pytest.approx(m_a["train/lr"]) and m_a["train/lr"] == pytest.approx(2e-3 / 3)
    assert max_change(w_a, weights(b)) < 1e-6  # same weights, optimizer moments and LR schedule


@pytest.mark.ray
@pytest.mark.parametrize("stage,tied,dtype", [(2, True, "float32"), (3, False, "float32"), (1, False, "bfloat16")])
def test_lora_trains_adapter_and_reference_is_base(tiny_model_dir, tiny_untied_model_dir, stage, tied, dtype):
    """The LoRA reference is the initial model (span rows included) under every ZeRO stage; the export is the
    policy (adapters and span rows merged, the untied head's rows too)."""
    from transformers import AutoModelForCausalLM

    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner
    from kardia_rl.learner.logprobs import response_logprobs

    path = tiny_model_dir if tied else tiny_untied_model_dir
    learner = DeepSpeedLearner(make_cfg("model.lora.enabled=true", "model.lora.r=4", "algo.kl_beta=0.01",
                                        "learner.lr=5e-3", f"learner.zero_stage={stage}", f"model.dtype={dtype}",
                                        "model.lora.span_rows_lr_scale=10", "algo.importance_correction=false"), path)
    assert learner.ref == "adapter_disabled"
    batch, probe, _ = rollout(learner.tokenizer)
    sd0 = learner.hf_state_dict()  # gathered under ZeRO-3
    for _ in range(2):
        m = learner.train_step(batch)
        assert finite_metrics(m) and m["train/step_applied"] == 1.0
    assert m["train/kl"] > 0
    sd = learner.hf_state_dict()
    assert any(not torch.equal(sd[k], sd0[k]) for k in sd if "q_proj.weight" in k)  # the merged adapters moved
    tol = 1e-5 if dtype == "float32" else 2e-2
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        want_ref = response_logprobs(base, batch)[0]
    assert torch.allclose(learner.compute_logprobs(batch, "ref"), want_ref, atol=tol)
    assert not torch.allclose(learner.compute_logprobs(batch, "policy"), want_ref, atol=10 * tol)
    span = sorted(learner.span_rows_trained)
    for key in ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"]):
        assert not torch.equal(sd[key][span], base.state_dict()[key][span]), key  # the span rows reach the export
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    merged.load_state_dict(sd, strict=False)
    merged.tie_weights()
    with torch.no_grad():
        got = response_logprobs(merged, batch)[0]
    assert torch.allclose(got, learner.compute_logprobs(batch), atol=tol if dtype == "float32" else 0.1)


# --- world size 2 ---------------------------------------------------------------------------------------
def _ws2_worker(rank, world_size, model_dir):
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

    learner = DeepSpeedLearner(make_cfg(), model_dir, rank=rank, world_size=world_size)
    batch, probe, _ = rollout(learner.tokenizer)
    mine = B.shard_rows(batch, rank, world_size)
    p0 = learner.compute_logprobs(probe)[:, 0].exp().tolist()
    first = learner.train_step(mine)
    if rank == 1:  # a NaN on one rank only must skip the step on both
        bad = dict(mine, advantages=mine["advantages"].clone())
        bad["advantages"][0] = float("nan")
    else:
        bad = mine
    w_before = weights(learner)
    skipped = learner.train_step(bad)
    unchanged = max_change(w_before, weights(learner)) == 0.0
    later = [learner.train_step(mine) for _ in range(2)]
    p1 = learner.compute_logprobs(probe)[:, 0].exp().tolist()
    return {"first": first, "skipped": skipped, "unchanged": unchanged, "later": later, "p0": p0, "p1": p1,
            "norm": sum(float(v.float().pow(2).sum()) for v in weights(learner).values())}


@pytest.mark.ray
def test_grpo_world_size_2_matches_world_size_1(tiny_model_dir):
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

    res = run_local_ranks(_ws2_worker, 2, tiny_model_dir, timeout_s=600)
    one = DeepSpeedLearner(make_cfg(), tiny_model_dir)
    batch, _, _ = rollout(one.tokenizer)
    ref = one.train_step(batch)
    for r in res:
        # global normalisation: same loss and gradient as one rank holding the whole batch
        assert r["first"]["train/policy_loss"] == pytest.approx(ref["train/policy_loss"], abs=1e-6)
        assert r["first"]["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-4)
        assert r["first"]["train/entropy"] == pytest.approx(ref["train/entropy"], rel=1e-5)
        assert r["first"]["train/tokens"] == ref["train/tokens"]
        assert r["skipped"]["train/step_applied"] == 0.0 and r["unchanged"]
        assert all(finite_metrics(m) and m["train/step_applied"] == 1.0 for m in r["later"])
        assert all(b > 1.5 * a for a, b in zip(r["p0"], r["p1"]))
    assert res[0]["norm"] == pytest.approx(res[1]["norm"], rel=1e-6)  # replicas stay identical


# --- gradient checkpointing -------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.ray
def test_gradient_checkpointing_really_runs_in_grpo_and_sft(tiny_model_dir, monkeypatch, stage):
    """HF layers checkpoint only in train mode: count the calls that reach torch's checkpoint (independently of
    the learner's own counter), in train_step and sft_step, none in no-grad scoring; same update as without.
    Stage 3 (cluster.yaml's): the recomputation re-gathers the partitioned weights."""
    import transformers.modeling_utils as mu

    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

    calls = []
    real = mu.checkpoint
    monkeypatch.setattr(mu, "checkpoint", lambda fn, *a, **k: calls.append(1) or real(fn, *a, **k))
    gc = DeepSpeedLearner(make_cfg("learner.gradient_checkpointing=true", f"learner.zero_stage={stage}"),
                          tiny_model_dir)
    plain = DeepSpeedLearner(make_cfg(f"learner.zero_stage={stage}"), tiny_model_dir)
    layers = gc.hf_config.num_hidden_layers
    batch, probe, _ = rollout(gc.tokenizer)
    n_micro = len(B.rollout_micro_batches(batch, gc.micro_batch_size))
    gc.compute_logprobs(probe)
    assert calls == []  # scoring runs in eval mode under no_grad: nothing to checkpoint
    m = gc.train_step(batch)
    assert len(calls) == layers * n_micro > 0
    assert m["train/checkpointed_layer_calls"] == len(calls) and m["train/grad_checkpointing"] == 1.0
    assert gc.module.training  # left in train mode after compute_logprobs restored it
    m_plain = plain.train_step(batch)
    assert m_plain["train/checkpointed_layer_calls"] == 0.0 and len(calls) == layers * n_micro
    assert m["train/policy_loss"] == pytest.approx(m_plain["train/policy_loss"], abs=1e-7)
    assert max_change(weights(gc), weights(plain)) < 1e-6  # recomputation changes memory, not the update
    ids = gc.tokenizer("I feel sad today. I am here for you.")["input_ids"]
    sft_batch = B.collate_sft([(ids, [B.IGNORE_INDEX] * 4 + ids[4:])] * 2, gc.tokenizer.pad_token_id)
    calls.clear()
    s = gc.sft_step(sft_batch)
    assert len(calls) == layers and s["train/checkpointed_layer_calls"] == layers
