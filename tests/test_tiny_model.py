import json
import os

import pytest

from kardia_rl.format import SPAN_TOKENS, build_messages, build_prompt


def test_tokenizer_round_trip_identical_ids(tiny_model_dir, sample_dialogues):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    auto = AutoTokenizer.from_pretrained(tiny_model_dir)
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tiny_model_dir, "tokenizer.json"))
    raw = Tokenizer.from_file(os.path.join(tiny_model_dir, "tokenizer.json"))
    text = "\n".join(m["content"] for d in sample_dialogues[:20] for m in d.messages)
    text += " Ünïcödé café — naïve 東京 😀 it's   spaced\ttabs\r\n"
    a = auto.encode(text, add_special_tokens=False)
    assert a == fast.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids
    assert auto.decode(a) == text
    for t in SPAN_TOKENS + ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(auto.encode(t, add_special_tokens=False)) == 1, t
    assert auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>"


def test_model_loads_and_chat_template_renders(tiny_model_dir, sample_dialogues):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 1.5e6
    d = sample_dialogues[0]
    prompt = build_prompt(tok, build_messages(d.person, d.situation, d.messages[1:2], system=d.system))
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    cfg = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from kardia_rl.errors import KardiaError
    from kardia_rl.model.tiny import build_tiny_model

    other = build_tiny_model(str(tmp_path / "again"), "tiny", seed=0)
    a, b = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(f"{other}/model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert open(f"{tiny_model_dir}/tokenizer.json").read() == open(f"{other}/tokenizer.json").read()
    with pytest.raises(KardiaError, match="already exists"):
        build_tiny_model(other, "tiny")
