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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from kardia_rl.model.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def sample_dialogues():
    from kardia_rl.data import load_dialogues

    return load_dialogues("builtin:sample")
