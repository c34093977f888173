"""Model preparation on small local models (fast): span rows, padding rows, hub cache offline, clear errors,
and prompt truncation that never cuts the chat header or the system prompt."""
from __future__ import annotations

import json
import os

import pytest
import torch

from kardia_rl.cli import main
from kardia_rl.config import load_config
from kardia_rl.format.spans import SPAN_TOKENS
from kardia_rl.model.prepare import MARKER, add_span_rows, prepare_model, prepared_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "conf", "tiny.yaml")
WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "hello", "world", "sad", "happy"]


def _word_model(folder, extra_rows: int, tied: bool) -> str:
    """A 1-layer Llama with a word-level tokenizer (not Qwen2) and `extra_rows` spare embedding rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kardia_rl.model.tiny import CHATML_TEMPLATE

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS) + extra_rows, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=tied))
    with torch.no_grad():  # spare rows hold junk, as an untrained padding row may
        model.get_input_embeddings().weight[len(WORDS):] = 50.0
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("extra_rows, tied", [(12, False), (0, True)])
def test_span_rows_mean_initialised_in_padding_rows_or_grown(tmp_path, extra_rows, tied):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    src = _word_model(tmp_path / "src", extra_rows, tied)
    rec = prepare_model(src, str(tmp_path / "out"))
    n = len(WORDS)
    assert rec["new_ids"] == list(range(n, n + 8)) and rec["architecture"] == "LlamaForCausalLM"
    if extra_rows:
        assert rec["rows"].startswith(f"used spare padding rows {n}..{n + 7} of {n + extra_rows}")
    else:
        assert rec["rows"] == f"grew the embeddings from {n} to {n + 8} rows"
    w = load_file(os.path.join(tmp_path, "out", "model.safetensors"))
    before = load_file(os.path.join(src, "model.safetensors"))
    for key in ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"]):
        mean = before[key][:n].mean(0)
        assert torch.allclose(w[key][n:n + 8], mean.expand(8, -1), atol=1e-6), key
        assert torch.equal(w[key][:n], before[key][:n])  # existing rows untouched
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert [tok.convert_tokens_to_ids(t) for t in SPAN_TOKENS] == list(range(n, n + 8))
    assert tok.chat_template == AutoTokenizer.from_pretrained(src).chat_template
    assert prepared_record(str(tmp_path / "out"))["source_sha256"] == rec["source_sha256"]


def test_add_span_rows_is_a_no_op_when_present(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = model.get_input_embeddings().weight.clone()
    info = add_span_rows(tok, model)
    assert info["new_ids"] == [] and torch.equal(before, model.get_input_embeddings().weight)


def _hub_cache(root, repo_id: str, files_from: str) -> str:
    """A Hugging Face cache holding `files_from` as the snapshot of `repo_id` (the layout huggingface_hub reads)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in os.listdir(files_from):
        if not name.startswith("."):
            os.symlink(os.path.join(files_from, name), snap / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_hub_id_prepared_offline_from_the_cache(tmp_path, monkeypatch, tiny_model_dir):
    from kardia_rl.pipeline import stage_model

    commit = _hub_cache(tmp_path / "hub", "kardia-test/tiny-chat", tiny_model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "model.path=kardia-test/tiny-chat"])
    out = stage_model(cfg, {})
    assert out["path"] == str(tmp_path / "run" / "prepared_model") and out["kind"] == "hub"
    rec = prepared_record(out["path"])
    assert rec["source"] == "kardia-test/tiny-chat" and rec["revision"] == commit and len(rec["source_sha256"]) == 64
    assert os.path.isfile(os.path.join(out["path"], "model.safetensors"))
    mtime = os.path.getmtime(os.path.join(out["path"], MARKER))
    assert stage_model(cfg, {})["path"] == out["path"]  # unchanged source: reused, not prepared again
    assert os.path.getmtime(os.path.join(out["path"], MARKER)) == mtime


@pytest.mark.parametrize("argv, expected", [
    (["train", TINY, "model.path=/nonexistent/model"],
     "model.path: '/nonexistent/model': no config.json there"),
    (["prepare", TINY, "--model", "nobody-kardia/no-such-model"],
     "error: model.path 'nobody-kardia/no-such-model': not a local path, and hub id nobody-kardia/no-such-model is "
     "not in the Hugging Face cache"),
    (["prepare", TINY, "--model", "{weightless}"], "no weights (no *.safetensors or pytorch_model*.bin files)"),
    (["prepare", TINY, "--model", "/nonexistent/model"], "no such file or folder (and not a hub id of the form org/name)"),
    (["prepare", TINY, "--model", "pkg:no_such_package_xyz/m.gguf"], "package 'no_such_package_xyz' is not installed"),
])
def test_bad_model_paths_give_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, expected):
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    argv = [a.replace("{weightless}", str(weightless)) for a in argv] + [f"run_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not os.path.exists(tmp_path / "run" / "prepared_model")


def test_truncation_keeps_header_and_system_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    from kardia_rl.data import TurnSample
    from kardia_rl.format.prompt import build_system_prompt
    from kardia_rl.data.encoding import encode_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    user = " ".join(f"word{i} and more text" for i in range(400))
    sample = TurnSample(id="x", dialogue_id="d", turn=0, person="A nurse who loves hiking.", mbti="", emotion="sad",
                        situation="My dog is ill.", anon_username="u", system=None,
                        history=[{"role": "user", "content": user}], target="")
    cfg = load_config(TINY, ["model.max_prompt_tokens=200"])
    ids = encode_prompt(sample, tok, cfg)
    text = tok.decode(ids)
    assert len(ids) <= 200
    system = build_system_prompt(sample.person, sample.situation)
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    kept = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert kept and user.endswith(kept)  # the START of the user turn was cut, its end kept
    with pytest.raises(Exception, match="system prompt and chat header alone take"):
        encode_prompt(sample, tok, load_config(TINY, ["model.max_prompt_tokens=20"]))


@pytest.mark.ray
@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_the_span_rows_and_nothing_else_of_the_embedding(tiny_model_dir, tiny_untied_model_dir, tied):
    """Mean-initialised span rows give the eight span tokens one shared logit: under LoRA their rows must train, the
    untied head's rows too (learner/span_rows.py); the export carries them merged, every other row unchanged."""
    from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner
    from kardia_rl.learner.ds_config import OptimSpec
    from kardia_rl.learner.sft import _collate
    from kardia_rl.data.encoding import load_training_turns
    from kardia_rl.learner.sft_data import build_examples

    path = tiny_model_dir if tied else tiny_untied_model_dir
    cfg = load_config(TINY, [f"model.path={path}", "model.lora.enabled=true", "learner.zero_stage=0",
                             "sft.lr=1e-2", "sft.warmup_steps=0", "data.max_history_turns=1", "learner.weight_decay=0.1"])
    learner = DeepSpeedLearner(cfg, path, optim=OptimSpec.sft(cfg, total_steps=1))
    examples, _, _ = build_examples(load_training_turns(cfg)[0][:2], learner.tokenizer, cfg)
    w0 = learner.hf_state_dict()
    learner.sft_step(_collate([(e.input_ids, e.labels, None) for e in examples], learner.tokenizer.pad_token_id))
    w1 = learner.hf_state_dict()
    ids = sorted(learner.tokenizer.convert_tokens_to_ids(t) for t in SPAN_TOKENS)
    assert learner.span_rows_trained == ids
    matrices = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    assert sorted(k for k in w0 if "embed" in k or "lm_head" in k) == sorted(matrices)
    for key in matrices:
        changed = (w1[key] - w0[key]).abs().sum(1) > 0
        assert changed[ids].all() and int(changed.sum()) == len(ids), key  # weight decay leaves the rest alone


def test_span_rows_get_their_own_learning_rate():
    """model.lora.span_rows_lr_scale: the span rows' group runs at lr x scale (at the adapters' rate they barely
    moved on SmolLM2: docs/models.md); at 1 the groups are as before."""
    from kardia_rl.learner.ds_config import param_groups

    lin, emb, bias = (torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(5, 2)),
                      torch.nn.Parameter(torch.zeros(2)))
    emb.kardia_no_decay = True
    named = [("lin", lin), ("emb", emb), ("bias", bias)]
    plain = param_groups(named, 0.1, 1e-3)
    assert [(len(g["params"]), g["weight_decay"], "lr" in g) for g in plain] == [(1, 0.1, False), (2, 0.0, False)]
    emb.kardia_lr_scale = 50.0
    groups = param_groups(named, 0.1, 1e-3)
    assert groups[-1]["params"] == [emb] and groups[-1]["lr"] == pytest.approx(5e-2) and groups[-1]["weight_decay"] == 0
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # the schedule scales every group alike
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-4, 2.5e-2])
    del sched


def test_template_without_a_system_role_gets_the_system_prompt_in_the_first_user_turn(tiny_model_dir):
    """Gemma-style chat templates raise on a system message: the prompt folds it into the first user turn."""
    from transformers import AutoTokenizer

    from kardia_rl.format.prompt import build_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    text = build_prompt(tok, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sad"}])
    assert text == ("<start_of_turn>user\nBe kind.\n\nHi<end_of_turn>\n<start_of_turn>assistant\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nSad<end_of_turn>\n<start_of_turn>model\n")


def test_eval_and_split_run_alone_on_a_hub_id(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """`kardia-rl eval --model ID` and `kardia-rl split --model ID` prepare the hub id themselves (offline, from
    the cache), as the pipeline's model stage does; before, both refused anything but a folder."""
    from kardia_rl.data import load_dialogues
    from kardia_rl.utils.io import atomic_write_jsonl

    _hub_cache(tmp_path / "hub", "kardia-test/tiny-chat", tiny_model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    run = tmp_path / "run"
    fast = [f"run_dir={run}", "rollout.engine=hf", "model.max_new_tokens=8", "model.max_prompt_tokens=384"]
    assert main(["eval", TINY, "--model", "kardia-test/tiny-chat", "--no-progress", "eval.max_samples=2", *fast]) == 0
    doc = json.loads((run / "eval" / "metrics.json").read_text())
    prepared = str(run / "prepared" / "kardia-test_tiny-chat")
    assert doc["models"]["tiny-chat"]["model_path"] == prepared and prepared_record(prepared)["kind"] == "hub"
    data = tmp_path / "two.jsonl"
    atomic_write_jsonl(str(data), [d.to_record() for d in load_dialogues("builtin:sample/train")[:2]])
    assert main(["split", TINY, "--model", "kardia-test/tiny-chat", "--data", str(data), "--no-progress",
                 "split.k=1", *fast]) == 0
    split = json.loads((run / "split" / "split.json").read_text())
    assert split["method"] == "sampled" and split["model"] == prepared
    capsys.readouterr()
    assert main(["eval", TINY, "--model", "nobody-kardia/absent", "--no-progress", *fast]) == 2
    assert "--model/--compare 'nobody-kardia/absent': not a local path, and hub id" in capsys.readouterr().err


def test_a_mistyped_model_path_exits_2_with_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # run_dir (runs/tiny) is relative: nothing may appear here either
    missing = tmp_path / "no" / "such" / "dir"
    assert main(["train", TINY, f"model.path={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.path" in err[0] and str(missing) in err[0], err
    assert os.listdir(tmp_path) == [], "a missing model.path builds nothing, anywhere"


def test_builtin_model_is_built_under_run_dir_only_when_asked(tmp_path, capsys):
    from kardia_rl.model.prepare import ensure_prepared

    run = tmp_path / "run"
    cfg = load_config(TINY, [f"run_dir={run}", "model.path=builtin:tiny", "model.init_seed=3"])
    path = ensure_prepared(cfg)
    assert path == str(run / "builtin_tiny_seed3") and os.path.isfile(os.path.join(path, "model.safetensors"))
    assert "built a random tiny model" in capsys.readouterr().out
    assert ensure_prepared(cfg) == path and "built" not in capsys.readouterr().out  # built once, then reused
    assert os.listdir(tmp_path) == ["run"]
    with pytest.raises(Exception, match=r"model.path 'builtin:huge': unknown builtin model; choose builtin:tiny"):
        ensure_prepared(load_config(TINY, [f"run_dir={run}", "model.path=builtin:huge"]))


def test_removed_init_size_key_says_what_replaces_it(tmp_path):
    with pytest.raises(Exception, match=r"model.init_size: removed: .*model.path: builtin:tiny"):
        load_config(TINY, ["model.init_size=tiny"])


def _without_template(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    if os.path.exists(os.path.join(dst, "chat_template.jinja")):
        os.remove(os.path.join(dst, "chat_template.jinja"))
    p = os.path.join(dst, "tokenizer_config.json")
    cfg = json.load(open(p))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(p, "w"))
    return str(dst)


def test_chat_template_by_name_or_file_and_refusal_naming_the_key(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from kardia_rl.model.prepare import ensure_prepared
    from kardia_rl.model.tiny import CHATML_TEMPLATE

    bare = _without_template(tiny_model_dir, tmp_path / "bare")
    assert AutoTokenizer.from_pretrained(bare).chat_template is None
    base = [f"run_dir={tmp_path / 'run'}", f"model.path={bare}"]
    with pytest.raises(Exception, match=r"the tokenizer has no chat template; set model.chat_template to .*chatml"):
        ensure_prepared(load_config(TINY, base))
    out = ensure_prepared(load_config(TINY, base + ["model.chat_template=chatml"]), log=lambda _: None)
    assert out == str(tmp_path / "run" / "prepared_model")
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML_TEMPLATE
    assert prepared_record(out)["chat_template"] == "chatml"
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(CHATML_TEMPLATE.replace("'\\n'", "'\\n\\n'"))
    out = ensure_prepared(load_config(TINY, base + [f"model.chat_template={jinja}"]), log=lambda _: None)
    assert AutoTokenizer.from_pretrained(out).chat_template == jinja.read_text(), "a changed template re-prepares"
    with pytest.raises(Exception, match=r"model.chat_template 'nope': not a known template \(chatml\) and no such file"):
        ensure_prepared(load_config(TINY, base + ["model.chat_template=nope"]))


@pytest.mark.ray
def test_a_model_without_chat_template_runs_prepare_sft_chat_with_model_chat_template(tiny_model_dir, tmp_path, capsys):
    bare = _without_template(tiny_model_dir, tmp_path / "bare")
    run, out = tmp_path / "run", tmp_path / "sft_model"
    common = [f"run_dir={run}", f"model.path={bare}", "sft.max_steps=1", "sft.max_seq_len=384",
              "model.max_new_tokens=8", "--no-progress", "--no-generate-eval", "--out", str(out)]
    assert main(["sft", TINY, *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.chat_template" in err[0] and str(bare) in err[0], err
    assert main(["sft", TINY, *common, "model.chat_template=chatml"]) == 0
    assert prepared_record(str(run / "prepared_model"))["chat_template"] == "chatml"
    turns = tmp_path / "turns.txt"
    turns.write_text("My cat died this morning.\n")
    from transformers import AutoTokenizer

    from kardia_rl.model.tiny import CHATML_TEMPLATE

    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHATML_TEMPLATE, "the SFT model keeps the template"
    capsys.readouterr()
    code = main(["chat", TINY, "--model", str(out), "--persona", "a retired teacher", "--situation", "lost a cat",
                 "--input", str(turns), "model.max_new_tokens=8"])
    text = capsys.readouterr().out
    assert code == 0 and text.count("you> ") == 1 and "assistant" in text, text
