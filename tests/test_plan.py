"""`kardia-rl plan`: passes on conf/cluster.yaml for 8 x 80 GB and names each problem with exit 2.

The 7B policy and 8B judge are described by config.json files written here (no hub, empty HF cache); the
cluster is described with --gpus/--gpu-mem, so nothing here needs a GPU or Ray. Runtime: a few seconds.
"""
from __future__ import annotations

import json
import os

import pytest

from kardia_rl.cli import main
from kardia_rl.format.spans import SPAN_TOKENS
from kardia_rl.plan_estimate import KNOWN_MODELS, activation_bytes, arch_from_config, kv_bytes_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "conf", "cluster.yaml")


@pytest.fixture
def cluster_args(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty HF cache: the models come from the folders
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    models = {}
    for name, key in (("policy", "Qwen/Qwen2.5-7B-Instruct"), ("judge", "Qwen/Qwen3-8B")):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(KNOWN_MODELS[key]))
        models[name] = str(d)
    # a prepared policy (what `kardia-rl train` needs): its tokenizer carries the span tokens
    (tmp_path / "policy" / "tokenizer_config.json").write_text(json.dumps({"added_tokens": list(SPAN_TOKENS)}))
    return [CLUSTER, "--mode", "train", "--gpus", "8", "--gpu-mem", "80", f"model.path={models['policy']}",
            f"judge.model={models['judge']}", "data.path=builtin:sample/train", "data.test_path=builtin:sample/test",
            f"run_dir={tmp_path / 'run'}"]


def run(capsys, args):
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if "PROBLEM" in line]


def test_cluster_yaml_fits_8_x_80gb(capsys, cluster_args):
    code, text = run(capsys, cluster_args)
    assert code == 0, text
    assert "[plan] OK" in text and not problems(text)
    assert "7.616B parameters" in text  # Qwen2.5-7B from its config.json


def test_cluster_yaml_pipeline_fits_with_sft_on_the_learner_group(capsys, cluster_args, tmp_path):
    """The pipeline's SFT (and the split's warm-ups) run on the 4 ZeRO-3 learner ranks: 7B full SFT at 2 x 4096
    tokens fits 80 GB per rank, so the whole pipeline passes; one rank (the old single-process SFT) would not."""
    args = [a for a in cluster_args if a not in ("--mode", "train")]
    code, text = run(capsys, args + [f"--json={tmp_path / 'plan.json'}"])
    assert code == 0, text
    assert "learner SFT per rank (GPU, ZeRO-3 x4" in text and not problems(text)
    sft = json.loads((tmp_path / "plan.json").read_text())["estimates_gib"]["learner_sft"]
    assert sft["ranks"] == 4 and sft["total"] < 80
    # one learner rank: the SFT role is named (ZeRO cannot shard across one rank); GRPO too at this size
    code, text = run(capsys, args + ["learner.num_workers=1"])
    assert code == 2
    sft_p = [p for p in problems(text) if "learner SFT rank (1 rank(s)" in p]
    assert len(sft_p) == 1 and "there is 80.00 GiB" in sft_p[0] and "learner.num_workers" in sft_p[0]


def test_16_learner_gpus_on_an_8_gpu_cluster(capsys, cluster_args):
    code, text = run(capsys, cluster_args + ["learner.num_workers=16"])
    assert code == 2
    (p,) = [x for x in problems(text) if "GPUs requested" in x]
    assert "learner.num_workers x learner.gpus_per_worker = 16" in p and "has 8" in p and "20 GPUs" in p


def test_7b_without_checkpointing_at_4x4096_does_not_fit_80gb(capsys, cluster_args):
    long = ["model.max_prompt_tokens=3584", "model.max_new_tokens=512", "learner.micro_batch_size=4"]
    code, text = run(capsys, cluster_args + long + ["learner.gradient_checkpointing=false"])
    assert code == 2
    grpo = [x for x in problems(text) if "learner GRPO rank (4 rank(s), 4 x 4096 tokens" in x]
    assert len(grpo) == 1 and "learner.gradient_checkpointing=false" in grpo[0] and "there is 80.00 GiB" in grpo[0]
    assert "set learner.gradient_checkpointing: true" in grpo[0]
    code, text = run(capsys, cluster_args + long)  # the same lengths with checkpointing (cluster.yaml) fit
    assert code == 0, text


def test_missing_data_file(capsys, cluster_args, tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    code, text = run(capsys, cluster_args + [f"data.path={missing}"])
    assert code == 2
    assert problems(text) == [f"[plan] PROBLEM: data.path: {missing}: file not found (the plan checks the paths "
                              "the job will read; run it where they exist, or override the key)"]


def test_explicit_1gib_kv_cache_for_a_7b_engine(capsys, cluster_args):
    code, text = run(capsys, cluster_args + ["rollout.kv_cache_bytes=1073741824"])
    assert code == 2
    (p,) = problems(text)
    # 2 x 28 layers x 4 KV heads x 128 x 2 bytes = 56 KiB per token: 1 GiB holds 18724 tokens, the step needs
    # 256 / 2 engines = 128 sequences x 2560 tokens
    assert "rollout.kv_cache_bytes=1073741824" in p and "holds 18724 tokens" in p and "128 sequences x 2560" in p
    assert "set rollout.kv_cache_bytes: 0" in p


def test_judge_kv_below_one_context_and_missing_model(capsys, cluster_args, tmp_path):
    code, text = run(capsys, cluster_args + ["judge.kv_cache_bytes=1073741824"])
    assert code == 2 and any("below one 8192-token sequence" in p for p in problems(text))
    code, text = run(capsys, cluster_args + [f"model.path={tmp_path / 'no_model'}"])
    assert code == 2 and any("model.path" in p and "no config.json there" in p for p in problems(text))


def test_tiny_default_passes_on_this_machine(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, text = run(capsys, [os.path.join(ROOT, "conf", "tiny.yaml")])
    assert code == 0, text
    assert "cluster (this machine)" in text


def test_parameter_count_and_formulas_match_the_built_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        arch = arch_from_config(json.load(f))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert arch.params() == sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    q7 = arch_from_config(KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"])
    assert kv_bytes_per_token(q7, 2) == 2 * 28 * 4 * 128 * 2
    # checkpointing keeps one hidden state per layer plus one layer's activations: 10x+ less at 7B
    assert activation_bytes(q7, 4096, 2, False) > 10 * activation_bytes(q7, 4096, 2, True)


def test_the_plan_counts_the_loss_temporaries(capsys, cluster_args, tmp_path):
    """chunked_entropy's and the cross-entropy's fp32 [chunk, positions, vocab] temporaries (measured by
    bench/bench_loss_memory.py) are a term of each learner role's total: ~4.6 GiB for 7B GRPO at 513 positions."""
    import inspect

    from kardia_rl.config import load_config
    from kardia_rl.learner import logprobs
    from kardia_rl.plan_estimate import (CUDA_CONTEXT_BYTES, FRAGMENTATION, LOSS_CHUNK_ROWS, gib,
                                         loss_temporary_bytes)

    for fn in (logprobs.gather_logprobs, logprobs.chunked_entropy, logprobs.response_logprobs, logprobs.sft_loss_sum):
        assert inspect.signature(fn).parameters["chunk_rows"].default == LOSS_CHUNK_ROWS, fn.__name__
    q7 = arch_from_config(KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"])
    assert loss_temporary_bytes(q7, 8, 513, "GRPO") == 4 * LOSS_CHUNK_ROWS * 513 * 152064 * 4  # 4.65 GiB
    assert loss_temporary_bytes(q7, 2, 4096, "SFT") == 2 * 2 * 4096 * 152064 * 4  # 2 rows: one chunk of 2
    args = [a for a in cluster_args if a not in ("--mode", "train")]
    code, text = run(capsys, args + [f"--json={tmp_path / 'plan.json'}"])
    assert code == 0, text
    est = json.loads((tmp_path / "plan.json").read_text())["estimates_gib"]
    cfg = load_config(CLUSTER, [a for a in args if "=" in a and not a.startswith("--")])
    want = {"learner_grpo": loss_temporary_bytes(q7, cfg.learner.micro_batch_size, cfg.model.max_new_tokens + 1, "GRPO"),
            "learner_sft": loss_temporary_bytes(q7, cfg.sft.micro_batch_size, cfg.sft.max_seq_len, "SFT")}
    for role, tmp in want.items():
        e = est[role]
        assert e["loss_temporaries"] == pytest.approx(gib(tmp), abs=1e-3), role
        parts = e["weights"] + e["grads"] + e["optimizer"] + e["reference"] + e["activations"] + e["logits"]
        assert e["total"] == pytest.approx((parts + e["loss_temporaries"]) * FRAGMENTATION + gib(CUDA_CONTEXT_BYTES),
                                           abs=0.02), role
    assert "+ loss temporaries 4.65 GiB" in text, text


def test_kv_cache_zero_means_gpu_share_on_gpu_and_1gib_on_cpu():
    from kardia_rl.config import load_config
    from kardia_rl.engines.vllm_compat import engine_kwargs
    from kardia_rl.errors import KardiaError

    common = dict(seed=0, dtype="bfloat16", max_model_len=2560, enforce_eager=True, gpu_memory_utilization=0.85,
                  tensor_parallel_size=1)
    gpu = engine_kwargs("m", kv_cache_bytes=0, gpu=True, **common)
    assert "kv_cache_memory_bytes" not in gpu and gpu["gpu_memory_utilization"] == 0.85
    assert engine_kwargs("m", kv_cache_bytes=1 << 28, gpu=True, **common)["kv_cache_memory_bytes"] == 1 << 28
    assert engine_kwargs("m", kv_cache_bytes=0, gpu=False, **common)["kv_cache_memory_bytes"] == 1 << 30
    assert load_config(CLUSTER).rollout.kv_cache_bytes == 0
    with pytest.raises(KardiaError, match="rollout.kv_cache_bytes: must be >= 0"):
        load_config(CLUSTER, ["rollout.kv_cache_bytes=-1"])


def test_gpu_check_runs_on_cpu(tmp_path):
    """bench/gpu_check.sh is for a GPU machine (no ray/deepspeed/vllm there); --cpu runs the same code small."""
    import subprocess
    import sys

    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["checkpointing"] for r in res["learner_step"]] == [False, True]
    assert all(r["loss_finite"] for r in res["learner_step"])
    fp32 = next(r for r in res["logprob_agreement"] if r["dtype"] == "float32")
    assert fp32["max_abs_diff"] < 1e-4  # cached incremental decoding and a full forward agree in fp32


def test_pipeline_and_train_run_the_plan_first(capsys, monkeypatch, tmp_path):
    """A problem stops the command with exit 2 before anything starts (no run_dir, no Ray, no model)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    tiny = os.path.join(ROOT, "conf", "tiny.yaml")
    run_dir = tmp_path / "run"
    code, text = run_cmd(capsys, ["pipeline", tiny, f"data.path={tmp_path / 'missing.jsonl'}", f"run_dir={run_dir}"])
    assert code == 2 and "[plan] PROBLEM: data.path" in text and not run_dir.exists()
    code, text = run_cmd(capsys, ["train", tiny, "learner.num_workers=2", "learner.gpus_per_worker=1",
                                  "learner.micro_batch_size=4", f"run_dir={run_dir}"])
    assert code == 2 and "learner.num_workers x learner.gpus_per_worker = 2" in text and not run_dir.exists()


def run_cmd(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.ray
def test_requests_are_checked_against_the_connected_ray_cluster():
    """A driver already connected to Ray (here a local one declaring 2 GPUs) is asked for its resources."""
    import ray

    from kardia_rl.config import load_config
    from kardia_rl.plan import build_plan, detect_cluster

    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), ["learner.gpus_per_worker=1", "learner.num_workers=4",
                                                                 "learner.micro_batch_size=4"])
    ray.init(num_cpus=1, num_gpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        cluster = detect_cluster(cfg)
        assert ray.is_initialized()  # the plan leaves the caller's connection alone
    finally:
        ray.shutdown()
    assert cluster.gpus == 2 and cluster.source.startswith("Ray cluster")
    plan = build_plan(cfg, cluster, "train")
    assert any("4 GPUs requested" in p and "has 2" in p for p in plan.problems)


def test_host_ram_and_shm_are_checked(capsys, cluster_args):
    """4 ranks each loading the 7B policy and a reference copy on CPU at start-up (learner.partitioned_init=false:
    the full load); an object-store weight sync (the hf engine's transport) puts the whole bf16 state dict in /dev/shm.
    With the partitioned load (the default) the same 64 GiB host passes the host-RAM check."""
    code, text = run(capsys, cluster_args + ["--host-mem", "64"])
    assert "partitioned at load" in text and not [p for p in problems(text) if "host RAM" in p], text
    code, text = run(capsys, cluster_args + ["--host-mem", "64", "--shm", "1", "rollout.engine=hf",
                                             "learner.partitioned_init=false"])
    assert code == 2
    ps = problems(text)
    assert any(p.startswith("[plan] PROBLEM: host RAM needs ~") and "there is 64.00 GiB" in p for p in ps)
    assert any("/dev/shm: rollout.weight_sync=auto puts 14.19 GiB" in p and "1.00 GiB" in p for p in ps)


def test_train_on_an_unprepared_model_names_the_exact_prepare_command(capsys, cluster_args, tmp_path):
    # a raw model: its tokenizer has no span tokens
    (tmp_path / "policy" / "tokenizer_config.json").write_text(json.dumps({"added_tokens": ["<|im_start|>"]}))
    code, text = run(capsys, cluster_args)
    assert code == 2
    (p,) = [x for x in problems(text) if "lacks the span tokens" in x]
    prepared = os.path.join(str(tmp_path / "run"), "prepared_model")
    assert f"kardia-rl prepare --model {tmp_path / 'policy'} --out {prepared}" in p
    assert f"model.path={prepared}" in p


def test_unreachable_judge_endpoint_is_one_problem_before_anything_starts(capsys, monkeypatch, tmp_path):
    """judge.backend=openai with nothing listening: the plan (run first by pipeline and train) names the URL,
    instead of every step timing out into fallbacks."""
    import socket

    with socket.socket() as s:  # a loopback port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    url = f"http://127.0.0.1:{port}/v1"
    code, text = run(capsys, [os.path.join(ROOT, "conf", "tiny.yaml"), "judge.backend=openai", f"judge.api_base={url}",
                              f"run_dir={tmp_path}"])
    assert code == 2 and problems(text) == [f"[plan] PROBLEM: judge.api_base {url!r}: no judge endpoint reachable "
                                            f"there (ConnectionRefusedError: [Errno 111] Connection refused); start "
                                            "the OpenAI-compatible server or fix judge.api_base"]
    with socket.socket() as srv:  # something listening: no problem
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/v1"
        code, text = run(capsys, [os.path.join(ROOT, "conf", "tiny.yaml"), "judge.backend=openai",
                                  f"judge.api_base={url}", f"run_dir={tmp_path}"])
    assert code == 0 and not problems(text), text


def test_cluster_yaml_prints_each_stage_placement_and_a_bounded_sft_validation(capsys, cluster_args, tmp_path):
    """Every stage names the actors that hold its GPUs (one pool set at a time, never more than the 8 GPUs), and
    SFT validation (the capped sample every sft.eval_every steps) is at most 10% of SFT training compute."""
    args = [a for a in cluster_args if a not in ("--mode", "train")]
    code, text = run(capsys, args + [f"--json={tmp_path / 'plan.json'}"])
    assert code == 0, text
    placed = {line.split(": ", 1)[0][len("[plan] placement "):]: line for line in text.splitlines()
              if line.startswith("[plan] placement ")}
    assert list(placed) == ["split warm-up SFT", "split rating", "SFT", "SFT format check", "GRPO", "eval",
                            "synthesis"]  # `kardia-rl synthesize`, a job of its own, on the same pools
    assert placed["GRPO"].endswith("learner ranks 4 x 1 GPU + rollout actors (vllm) 2 x 1 GPU + judge actors (vllm) "
                                   "2 x 1 GPU = 8 GPUs of 8")
    assert placed["SFT format check"].endswith("rollout actors (vllm) 2 x 1 GPU = 2 GPUs of 8")
    v = json.loads((tmp_path / "plan.json").read_text())["estimates_gib"]["sft_validation"]
    assert v["n_val"] == 256 and v["eval_every"] == 20
    assert v["share"] == pytest.approx(256 / (3 * 128 * 20)) and v["share"] <= 0.10
    assert "% of SFT training compute" in text
    # the whole validation set every 20 steps (the uncapped ~15.6k turns) is flagged
    code, text = run(capsys, args + ["sft.max_val_samples=15600"])
    assert code == 0 and "warning: SFT validation costs 203% of SFT training compute" in text


@pytest.mark.parametrize("override,stages,says", [
    ("rollout.gpus_per_actor=0", "split rating, SFT format check, GRPO, eval", "hold no GPU in Ray's accounting"),
    ("judge.gpus_per_actor=0.5", "split rating, GRPO, eval", "two engines on one GPU"),
    ("learner.gpus_per_worker=0.5", "split warm-up SFT, SFT, GRPO", "two learner ranks on one GPU")])
def test_a_gpu_model_outside_ray_or_sharing_a_gpu_is_refused(capsys, cluster_args, override, stages, says):
    args = [a for a in cluster_args if a not in ("--mode", "train")]
    code, text = run(capsys, args + [override])
    assert code == 2
    key, value = override.split("=")
    (p,) = [x for x in problems(text) if says in x]
    assert p.startswith(f"[plan] PROBLEM: {key}={float(value):g} ({stages}):"), p


def test_a_stage_with_more_gpus_than_the_cluster_is_named(capsys, cluster_args):
    """Synthesis on the pools (synth.pool=ray): 10 engine actors of 1 GPU each, more than the 8 GPUs."""
    code, text = run(capsys, cluster_args + ["synth.pool=ray", "synth.num_engines=10"])
    assert code == 2
    (p,) = problems(text)
    assert p.startswith("[plan] PROBLEM: synthesis: synth.num_engines x rollout.gpus_per_actor = 10") and "has 8" in p
