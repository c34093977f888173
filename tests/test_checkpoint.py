"""Checkpoint manifests: every file's size and checksum written last, verified on resume; a damaged newest
checkpoint falls back to the newest intact one; pruning never deletes the only intact checkpoint."""
from __future__ import annotations

import json
import os

import pytest

from kardia_rl.errors import KardiaError
from kardia_rl.trainer.checkpoint import CheckpointManager, verify_checkpoint


def _learner(payload: bytes):
    def save(d: str) -> None:
        os.makedirs(os.path.join(d, "shard"), exist_ok=True)
        with open(os.path.join(d, "shard", "model.pt"), "wb") as f:
            f.write(payload)
    return save


def _saved(tmp_path, steps=(1, 2), keep_last=3) -> CheckpointManager:
    m = CheckpointManager(str(tmp_path), keep_last=keep_last)
    for s in steps:
        m.save(s, {"prompts": {"pos": s}}, _learner(bytes([s]) * 4096))
    return m


def test_manifest_lists_every_file_and_verifies(tmp_path):
    m = _saved(tmp_path)
    path = m.path(2)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert sorted(manifest["files"]) == ["driver.json", os.path.join("learner", "shard", "model.pt")]
    assert manifest["files"][os.path.join("learner", "shard", "model.pt")]["size"] == 4096
    assert verify_checkpoint(path) == []
    assert m.latest() == path


def test_truncated_file_in_latest_falls_back_with_a_warning(tmp_path):
    m = _saved(tmp_path)
    with open(os.path.join(m.path(2), "learner", "shard", "model.pt"), "r+b") as f:
        f.truncate(100)
    warnings = []
    assert m.latest(warn=warnings.append) == m.path(1)
    assert len(warnings) == 1 and "step_000002" in warnings[0] and "model.pt: 100 bytes, manifest says 4096" in warnings[0]


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path):
    m = _saved(tmp_path)
    p = os.path.join(m.path(2), "driver.json")
    text = open(p).read()
    open(p, "w").write(text.replace("{", "[", 1))  # same length, invalid JSON
    assert verify_checkpoint(m.path(2)) == ["driver.json: checksum differs from the manifest"]
    assert m.latest(warn=lambda _: None) == m.path(1)


def test_missing_manifest_counts_as_partial(tmp_path):
    m = _saved(tmp_path)
    os.remove(os.path.join(m.path(2), "manifest.json"))
    assert "no manifest.json" in verify_checkpoint(m.path(2))[0]
    assert m.latest(warn=lambda _: None) == m.path(1)


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    m = _saved(tmp_path)
    for s in (1, 2):
        os.remove(os.path.join(m.path(s), "learner", "shard", "model.pt"))
    with pytest.raises(KardiaError, match=r"no intact checkpoint .*step_000001: learner/shard/model.pt: missing"):
        m.latest(warn=lambda _: None)
    assert CheckpointManager(str(tmp_path / "none")).latest() is None


def test_prune_keeps_the_newest_intact_even_beyond_keep_last(tmp_path):
    m = _saved(tmp_path, steps=(1, 2), keep_last=5)
    os.remove(os.path.join(m.path(2), "manifest.json"))  # newest damaged
    m.keep_last = 1
    m._prune()
    assert [os.path.basename(p) for p in m.steps()] == ["step_000001", "step_000002"]
    m.save(3, {}, _learner(b"x" * 10))  # a new intact checkpoint: now the older ones may go
    assert [os.path.basename(p) for p in m.steps()] == ["step_000003"]


def test_checkpoints_command_lists_status_and_exit_codes(tmp_path, capsys):
    from kardia_rl.cli import main

    m = _saved(tmp_path)
    with open(os.path.join(m.path(2), "driver.json"), "a") as f:
        f.write("x")
    assert main(["checkpoints", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step_000001" in out and "ok" in out
    assert "step_000002" in out and "DAMAGED: driver.json:" in out
    assert "resume would use: step_000001" in out
    os.remove(os.path.join(m.path(1), "manifest.json"))
    assert main(["checkpoints", str(tmp_path)]) == 2
    assert main(["checkpoints", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
