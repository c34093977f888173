"""Checkpoint manifests: every file's size and checksum written last, verified on resume; a damaged newest
checkpoint falls back to the newest intact one; pruning never deletes the only intact checkpoint."""
from __future__ import annotations

import json
import os

import pytest

from kardia_rl.errors import KardiaError
from kardia_rl.cluster.checkpoint import CheckpointManager, verify_checkpoint


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


def _sharded(shards: dict):
    """A learner save as the learner group does it: write rank files, return what each rank hashed."""
    from kardia_rl.cluster.checkpoint import hash_files, rank_share

    def save(d: str) -> dict:
        for rel, payload in shards.items():
            os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
            with open(os.path.join(d, rel), "wb") as f:
                f.write(payload)
        out: dict = {}
        for r in range(2):
            out.update(hash_files(d, rank_share(d, r, 2)))
        return out
    return save


SHARDS = {"latest": b"step1", "step1/mp_rank_00_model_states.pt": b"m" * 3000,
          "step1/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"a" * 5000,
          "step1/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"b" * 5000}


def test_rank_shares_cover_every_file_once_and_each_rank_hashes_its_own_shard(tmp_path):
    from kardia_rl.cluster.checkpoint import rank_share

    _sharded(SHARDS)(str(tmp_path))
    shares = [rank_share(str(tmp_path), r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(SHARDS)
    assert "step1/zero_pp_rank_0_mp_rank_00_optim_states.pt" in shares[0]
    assert "step1/zero_pp_rank_1_mp_rank_00_optim_states.pt" in shares[1]


def test_each_save_hashes_one_checkpoint_and_prunes_by_name(tmp_path, monkeypatch):
    import kardia_rl.cluster.checkpoint as ck

    hashed = []
    real = ck._digest
    monkeypatch.setattr(ck, "_digest", lambda p: hashed.append(os.path.getsize(p)) or real(p))
    m = CheckpointManager(str(tmp_path), keep_last=2)
    for step in range(1, 5):
        hashed.clear()
        path = m.save(step, {"pos": step}, _sharded(SHARDS))
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns
                   if n != "manifest.json")
        assert sum(hashed) == size, f"save {step}: hashed {sum(hashed)} bytes for a {size}-byte checkpoint"
        verdict = json.load(open(os.path.join(path, "manifest.json")))["verified"]
        assert verdict["intact"] and verdict["hashed_bytes"]["learner ranks"] == sum(len(b) for b in SHARDS.values())
    assert [os.path.basename(p) for p in m.steps()] == ["step_000003", "step_000004"]
    assert verify_checkpoint(m.path(4)) == []


def test_a_file_changed_after_its_rank_hashed_it_fails_the_save_and_leaves_nothing(tmp_path):
    def save(d: str) -> dict:
        files = _sharded(SHARDS)(d)
        with open(os.path.join(d, "step1", "mp_rank_00_model_states.pt"), "r+b") as f:
            f.truncate(10)  # e.g. a short write that the rank's read-back did not see
        return files

    m = CheckpointManager(str(tmp_path))
    with pytest.raises(KardiaError, match=r"mp_rank_00_model_states.pt is 10 bytes on disk, hashed at 3000"):
        m.save(1, {}, save)
    assert os.listdir(m.root) == []


def test_leftovers_of_an_interrupted_save_are_removed_at_start_up(tmp_path):
    m = _saved(tmp_path, steps=(1,))
    os.makedirs(os.path.join(m.root, ".tmp-step_000002-abc", "learner"))
    open(os.path.join(m.root, ".tmp-step_000002-abc", "learner", "x.pt"), "wb").write(b"x" * 2048)
    os.makedirs(os.path.join(m.root, ".old-step_000001-def", "x"))
    open(os.path.join(m.root, ".latest.q1w2.tmp"), "w").write("step_000002")
    logged = []
    gone = CheckpointManager(str(tmp_path)).remove_leftovers(log=logged.append)
    assert gone == [".latest.q1w2.tmp", ".old-step_000001-def", ".tmp-step_000002-abc"]
    assert sorted(os.listdir(m.root)) == ["latest", "step_000001"]
    assert any(".tmp-step_000002-abc" in line and "interrupted save" in line for line in logged)
    assert m.latest() == m.path(1)
