"""The LoRA span rows (learner/span_rows.py): small deltas for the 8 span tokens' input rows and, when the LM head is
untied (Qwen2.5-7B, Llama 3), its output rows; the LoRA reference sees the initial rows on the module's own device.

The quick tests build peft models directly; the SFT test (about 20-30 s per dtype) runs the DeepSpeed learner.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from kardia_rl.config import load_config
from kardia_rl.format.spans import SPAN_TOKENS, render_spans


def _mean_initialised(model_dir: str, out_dir: str) -> str:
    """A copy of `model_dir` whose span rows all start at the mean row, as model/prepare.py leaves a hub model: the
    eight span logits are then identical until the rows train."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kardia_rl.model.prepare import mean_init_rows

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    ids = [tok.convert_tokens_to_ids(t) for t in SPAN_TOKENS]
    mean_init_rows(model, ids, min(ids))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _peft(model_dir: str, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kardia_rl.learner.span_rows import attach_span_rows

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ids = attach_span_rows(model, tok, 1.0)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained state: adapters and span rows away from their start
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model.eval(), ids


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_span_row_deltas_and_adapters_train(tiny_model_dir, tiny_untied_model_dir, tied):
    model, ids = _peft(tiny_model_dir if tied else tiny_untied_model_dir)
    hidden = model.get_input_embeddings().weight.shape[1]
    extra = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert sorted(n.rsplit(".", 2)[-2] for n in extra) == (["kardia_span_in"] if tied else
                                                           ["kardia_span_in", "kardia_span_out"])
    assert all(p.shape == (len(ids), hidden) and p.kardia_no_decay for p in extra.values())
    assert not model.get_input_embeddings().weight.requires_grad  # no full-matrix gradient or Adam state


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_initial_model_and_the_export_is_the_policy(tiny_model_dir, tiny_untied_model_dir, tied,
                                                                     dtype):
    from transformers import AutoModelForCausalLM

    from kardia_rl.learner.export import hf_state_dict
    from kardia_rl.learner.span_rows import initial_span_rows

    path = tiny_model_dir if tied else tiny_untied_model_dir
    model, ids = _peft(path, dtype)
    x = torch.tensor([[5, 6, *ids, 7, ids[3]]])
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        policy = model(input_ids=x).logits
        with model.disable_adapter(), initial_span_rows(model):
            ref = model(input_ids=x).logits
        assert torch.equal(ref, base(input_ids=x).logits)  # exactly the initial model, span rows included
        assert not torch.allclose(policy, ref, atol=1.0)
        sd = hf_state_dict(model)
        assert not [k for k in sd if "kardia" in k or "lora" in k]
        missing, unexpected = base.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) == ({"lm_head.weight"} if tied else set())
        base.tie_weights()
        # the merged export reproduces the policy (bf16: rounding of W + delta and of the LoRA merge)
        assert torch.allclose(base(input_ids=x).logits, policy, atol=1e-4 if dtype == torch.float32 else 0.3)


@pytest.mark.parametrize("tied", [True, False])
def test_reference_forward_substitutes_only_tensors_on_the_modules_device_and_dtype(tiny_model_dir,
                                                                                     tiny_untied_model_dir, tied):
    """The reference used to swap in a copy of the embedding made before DeepSpeed moved the model (CPU index, CUDA
    weight at GRPO step 1 on any GPU). Here the model is moved AFTER the span rows were attached, to the meta device
    and bf16: a tensor left behind on the CPU, or kept in fp32, fails the forward or the checks below."""
    from kardia_rl.learner.span_rows import SpanRowDelta, initial_span_rows

    model, ids = _peft(tiny_model_dir if tied else tiny_untied_model_dir)
    model.to(device="meta", dtype=torch.bfloat16)
    seen = []
    for mod in model.modules():
        if isinstance(mod, SpanRowDelta):
            mod.register_forward_hook(lambda m, args, out: seen.append(
                (m.enabled, {t.device.type for t in (*args[1:], out, m.delta, m.ids)},
                 {t.dtype for t in (args[2], out, m.delta)})))
    x = torch.tensor([[5, 6, *ids, 7]], device="meta")
    with torch.no_grad():
        assert model(input_ids=x).logits.device.type == "meta"
        with model.disable_adapter(), initial_span_rows(model):
            out = model(input_ids=x).logits
    assert out.device.type == "meta" and out.dtype == torch.bfloat16
    assert [s[0] for s in seen] == [True, True, False, False]  # embedding and head hooks, policy then reference
    assert all(devices == {"meta"} and dtypes == {torch.bfloat16} for _, devices, dtypes in seen), seen
    # the old design (a CPU copy of the embedding passed as an override) fails exactly this way
    name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    copy0 = torch.zeros(model.get_input_embeddings().weight.shape, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="device"):
        torch.func.functional_call(model, {name: copy0}, args=(), kwargs={"input_ids": x})


def _untied_lora_sft(model_dir: str, work: str, dtype: str, stage: int) -> dict:
    """A short LoRA SFT of the mean-initialised untied model (in a spawned child, see the test): the span-logit
    spread before and after, the greedy answers, and the spread of the exported model."""
    from transformers import AutoModelForCausalLM

    from kardia_rl.data.encoding import load_training_turns
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner
    from kardia_rl.learner.ds_config import OptimSpec
    from kardia_rl.data.encoding import encode_prompt
    from kardia_rl.learner.sft import _collate
    from kardia_rl.learner.sft_data import build_examples

    path = _mean_initialised(model_dir, os.path.join(work, "model"))
    cfg = load_config("conf/tiny.yaml", [f"model.path={path}", "model.lora.enabled=true", f"learner.zero_stage={stage}",
                                         "sft.lr=1e-2", "sft.warmup_steps=0", "data.max_history_turns=1",
                                         f"model.dtype={dtype}", "model.max_new_tokens=48",
                                         "model.lora.span_rows_lr_scale=10"])
    steps = 60
    torch.manual_seed(0)  # the adapters' initialisation
    learner = DeepSpeedLearner(cfg, path, optim=OptimSpec.sft(cfg, total_steps=steps))
    # short four-span targets with fixed words: what is learnt here is the span tokens, not the emotion labels
    samples = [dataclasses.replace(s, target=render_spans("sad", "why", "hurt", "ok"))
               for s in load_training_turns(cfg)[0][:8]]
    examples, _, _ = build_examples(samples, learner.tokenizer, cfg)
    batch = _collate([(e.input_ids, e.labels, None) for e in examples], learner.tokenizer.pad_token_id)
    ids = learner.span_rows_trained
    prompt = torch.tensor([[t for t, y in zip(examples[0].input_ids, examples[0].labels) if y == -100]])

    def spread(model) -> float:
        with torch.no_grad():
            logits = model(input_ids=prompt).logits[0, -1, ids].float()
        return float(logits.max() - logits.min())

    before = spread(learner.module)
    for _ in range(steps):
        learner.sft_step(batch)
    after = spread(learner.module)
    answers = []  # greedy, one process (world size 1): the model itself, not a rollout engine
    learner.module.eval()
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([encode_prompt(s, learner.tokenizer, cfg)])
            out = learner.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=cfg.model.max_new_tokens,
                                          eos_token_id=learner.tokenizer.eos_token_id,
                                          pad_token_id=learner.tokenizer.pad_token_id)
            answers.append(learner.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
    exported = AutoModelForCausalLM.from_pretrained(learner.save_pretrained(os.path.join(work, "out"))).eval()
    return {"before": before, "after": after, "answers": answers, "exported": spread(exported)}


@pytest.mark.ray
@pytest.mark.parametrize("dtype,stage", [("float32", 0), ("bfloat16", 2)])
def test_untied_lora_sft_separates_the_span_logits_and_opens_the_four_spans(tiny_untied_model_dir, tmp_path,
                                                                            dtype, stage, monkeypatch):
    """Issue 21: on an untied model the head's 8 span rows started equal and were frozen under LoRA, so the span
    logits stayed identical (spread exactly 0.0) and no answer could open the spans in order. After a short LoRA
    SFT the spread is large and every greedy answer opens the four spans, from the learner and from its export.

    In a spawned child: an earlier in-process engine or learner of the same pytest process leaves torch.distributed
    groups that DeepSpeed's initialize trips over ("Group ... is not registered"), and the child must not inherit
    the MASTER_PORT an earlier in-process learner set (its store still listens there)."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        res = pool.submit(_untied_lora_sft, tiny_untied_model_dir, str(tmp_path), dtype, stage).result()
    assert res["before"] == 0.0  # mean-initialised rows: one shared span logit
    print(f"span-logit spread (max - min of the 8 span logits at the answer's first position), {dtype}: "
          f"{res['after']:.3f}")
    assert res["after"] > 1.0
    begins = [t for t in SPAN_TOKENS if t.endswith("_begin|>")]

    def opens_four(text: str) -> bool:
        at = [text.find(t) for t in begins]
        return min(at) >= 0 and at == sorted(at)

    print("\n".join(res["answers"]))
    assert all(opens_four(a) for a in res["answers"]), "\n".join(res["answers"])
    assert res["exported"] == pytest.approx(res["after"], rel=0.05, abs=0.05)  # the engines get the merged rows
