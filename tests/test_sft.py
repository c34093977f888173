"""SFT stage: label masking, packing, a short run that lowers the validation loss, and a loadable output.

Runtime about 30-45 s on 2 busy cores (one short training run on a subset of the bundled data).
"""
from __future__ import annotations

import json
import os
import types

import pytest
import torch

from kardia_rl.config import load_config
from kardia_rl.errors import KardiaError
from kardia_rl.data import normalize_emotion
from kardia_rl.format.spans import parse_spans, render_spans
from kardia_rl.learner import batching as B
from kardia_rl.data.encoding import encode_prompt, load_training_turns
from kardia_rl.learner.sft_data import build_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def cfg_for(model_dir, run_dir, *overrides):
    return load_config("conf/tiny.yaml", [f"model.path={model_dir}", f"run_dir={run_dir}", "sft.max_seq_len=768",
                                          "data.max_history_turns=1"] + list(overrides))


def test_labels_mask_exactly_the_prompt(tiny_model_dir, tokenizer, tmp_path):
    cfg = cfg_for(tiny_model_dir, tmp_path)
    train, val = load_training_turns(cfg)
    assert train and val and not {s.dialogue_id for s in train} & {s.dialogue_id for s in val}
    examples, cut, prompts_cut = build_examples(train[:5], tokenizer, cfg)
    assert cut == 0 and prompts_cut == 0  # sft.max_seq_len is set to fit the whole prompt and target
    for ex, s in zip(examples, train[:5]):
        n_prompt = len(encode_prompt(s, tokenizer, cfg))
        assert ex.prompt_ids == encode_prompt(s, tokenizer, cfg)
        assert ex.labels[:n_prompt] == [B.IGNORE_INDEX] * n_prompt
        assert all(x != B.IGNORE_INDEX for x in ex.labels[n_prompt:])
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
        assert ex.input_ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(ex.input_ids[n_prompt:], skip_special_tokens=False)
        assert text == s.target + "<|im_end|>"
        assert tokenizer.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n")
    batch = B.collate_sft([(e.input_ids, e.labels) for e in examples], tokenizer.pad_token_id)
    lengths = [len(e) for e in examples]
    for i, n in enumerate(lengths):  # padding is masked too
        assert (batch["labels"][i, n:] == B.IGNORE_INDEX).all() and (batch["attention_mask"][i, n:] == 0).all()


def test_prompt_budget_drops_oldest_history_first(tiny_model_dir, tokenizer, tmp_path):
    cfg = load_config("conf/tiny.yaml", [f"model.path={tiny_model_dir}", "data.max_history_turns=0"])
    train, _ = load_training_turns(cfg)
    long = max(train, key=lambda s: len(s.history))
    full = encode_prompt(long, tokenizer, cfg)
    cut = encode_prompt(long, tokenizer, cfg, max_tokens=len(full) - 1)
    assert len(cut) < len(full)
    assert tokenizer.decode(cut).startswith("<|im_start|>system")  # whole turns dropped, not the system prompt
    assert tokenizer.decode(cut).endswith(long.user_turn + "<|im_end|>\n<|im_start|>assistant\n")


def test_short_max_seq_len_cuts_prompts_and_says_so(tiny_model_dir, tokenizer, tmp_path):
    cfg = cfg_for(tiny_model_dir, tmp_path, "sft.max_seq_len=380")
    train, _ = load_training_turns(cfg)
    examples, targets_cut, prompts_cut = build_examples(train[:4], tokenizer, cfg)
    assert prompts_cut == 4 and targets_cut == 0 and all(len(e) <= 380 for e in examples)
    for e, s in zip(examples, train):  # the start of the user turn was cut, never the header or system prompt
        assert tokenizer.decode(e.prompt_ids).startswith("<|im_start|>system\n" + s.system.strip()[:40]) if s.system \
            else tokenizer.decode(e.prompt_ids).startswith("<|im_start|>system\n")
    with pytest.raises(KardiaError, match="system prompt and chat header of sample .* alone take"):
        build_examples(train[:1], tokenizer, cfg_for(tiny_model_dir, tmp_path, "sft.max_seq_len=200"))
    assert all(e.input_ids[-1] == tokenizer.eos_token_id for e in examples)  # the answer keeps its end


def test_packing_restarts_positions_and_keeps_labels():
    ex = [([1, 2, 3], [B.IGNORE_INDEX, 2, 3]), ([4, 5], [B.IGNORE_INDEX, 5]), ([6, 7, 8, 9], [B.IGNORE_INDEX] * 4)]
    packed, pos = B.pack_examples(ex, max_seq_len=5)
    assert packed[0] == ([1, 2, 3, 4, 5], [B.IGNORE_INDEX, 2, 3, B.IGNORE_INDEX, 5]) and pos[0] == [0, 1, 2, 0, 1]
    assert packed[1][0] == [6, 7, 8, 9] and pos[1] == [0, 1, 2, 3]
    batch = B.collate_sft(packed, 0, pos)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]


def count_independently(samples, texts):
    """(format-valid rate, emotion accuracy) of answers, straight from the parser: a label counts only in a
    well-formed answer."""
    parsed = [parse_spans(t) for t in texts]
    ok = [p.ok for p in parsed]
    emo = [p.ok and normalize_emotion(p.spans.emotion) == s.emotion for p, s in zip(parsed, samples)]
    return sum(ok) / len(texts), sum(emo) / len(texts)


def test_score_answers_counts_only_well_formed_answers(tiny_model_dir, tmp_path):
    """The format check's counting on crafted answers: the old rule also credited the emotion span of a malformed
    answer (0.5 here instead of 0.25)."""
    from kardia_rl.learner import sft

    cfg = cfg_for(tiny_model_dir, tmp_path)
    _, val = load_training_turns(cfg)
    samples = val[:4]
    other = next(e for e in ("joyful", "sad") if e != samples[1].emotion)
    texts = [render_spans("u", "r", samples[0].emotion, "ok"),  # well-formed, right label
             render_spans("u", "r", other, "ok"),  # well-formed, wrong label
             render_spans("u", "r", samples[2].emotion, "ok")[:-5],  # right label, malformed (response unclosed)
             samples[3].emotion]  # a bare label
    res = sft.score_answers(samples, texts, cfg, keep_examples=4)
    assert (res["format_valid_rate"], res["emotion_accuracy"], res["n"]) == (0.5, 0.25, 4)
    assert (res["format_valid_rate"], res["emotion_accuracy"]) == count_independently(samples, texts)
    assert [e["output"] for e in res["examples"]] == texts


def test_max_val_samples_is_a_fixed_seeded_subset(tiny_model_dir, tmp_path):
    """sft.max_val_samples caps the validation turns with the same seeded subset every time (0 = all)."""
    from kardia_rl.learner.sft import val_sample

    cfg = cfg_for(tiny_model_dir, tmp_path, "sft.max_val_samples=5")
    _, val = load_training_turns(cfg)
    assert len(val) > 5
    first = val_sample(val, cfg)
    assert len(first) == 5 and [s.id for s in first] == [s.id for s in val_sample(list(val), cfg)]
    assert {s.id for s in first} <= {s.id for s in val}
    assert val_sample(val, cfg_for(tiny_model_dir, tmp_path, "sft.max_val_samples=0")) == list(val)
    with pytest.raises(KardiaError, match="sft.max_val_samples: must be >= 0"):
        cfg_for(tiny_model_dir, tmp_path, "sft.max_val_samples=-1")


@pytest.mark.ray
def test_short_sft_lowers_val_loss_and_saves_loadable_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from kardia_rl.learner.sft import run_sft

    cfg = cfg_for(tiny_model_dir, tmp_path, "sft.lr=3e-3", "sft.batch_size=8", "sft.micro_batch_size=4",
                  "sft.max_steps=6", "sft.eval_every=3", "sft.max_seq_len=384", "sft.max_val_samples=6")
    train, val = load_training_turns(cfg)
    out = tmp_path / "sft_out"
    res = run_sft(cfg, str(out), train_samples=train[:48], val_samples=val[:8], progress=False)
    assert res["steps"] == 6 and res["skipped_steps"] == 0
    assert [s for s, _ in res["val_loss_history"]] == [3, 6]
    assert (res["val_examples"], res["val_turns_total"]) == (6, 8)  # the loss scored the capped sample
    assert res["val_loss_final"] < res["val_loss_initial"] - 0.5, res
    saved = json.loads((out / "sft_result.json").read_text())
    assert saved["val_loss_final"] == pytest.approx(res["val_loss_final"])
    assert len((out / "sft_metrics.jsonl").read_text().splitlines()) == 6
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)
    assert os.path.exists(out / "tokenizer.json") and os.path.exists(out / "generation_config.json")
