"""Operating `kardia-rl synthesize` at scale: the filters' embedding cache (re-filtering a resumed run encodes
only new user turns, with bit-identical results) and SIGTERM (stop between role calls, keep finished
dialogues, exit 143, resume to the same output as an uninterrupted run)."""
from __future__ import annotations

import copy
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kardia_rl.synth import filters
from synth_server import SynthServer
from test_synth import ROOT, overrides, resume_inputs, run_cli
from test_synth_filters import UNSAFE, _cfg, _paraphrase, _sample_records, _set_user


@pytest.fixture
def encoded(monkeypatch):
    """Every text the filters send to MiniLM, in order (the real encoder still runs)."""
    seen: list[str] = []
    real = filters._encode

    def counting(texts):
        seen.extend(texts)
        return real(texts)

    monkeypatch.setattr(filters, "_encode", counting)
    return seen


def _records() -> list[dict]:
    """30 bundled dialogues plus a near duplicate and an unsafe one, so both embedding filters drop something."""
    samples = _sample_records()
    recs = [dict(copy.deepcopy(r), id=f"s{i}") for i, r in enumerate(samples[:30])]
    clean = dict(copy.deepcopy(samples[0]), id="s0")
    return recs + [_paraphrase(clean, "dup"), _set_user(dict(copy.deepcopy(samples[10]), id="unsafe"), 1, UNSAFE)]


def _users(recs) -> list[str]:
    return [m["content"] for r in recs for m in r["messages"] if m["role"] == "user"]


def test_embedding_cache_encodes_only_new_turns_with_identical_results(tmp_path, encoded, monkeypatch):
    records, cfg, cache = _records(), _cfg(), str(tmp_path / "cache")
    kept_ref, counts_ref = filters.apply_filters(records, cfg)  # no cache: every distinct turn encoded
    assert len(encoded) == len(set(_users(records))) and counts_ref["near_duplicate"] == counts_ref["unsafe_user"] == 1

    del encoded[:]
    half = records[:15]  # a first run saw half the records; the next (resumed) run sees all of them
    filters.apply_filters(half, cfg, cache_dir=cache)
    assert len(encoded) == len(set(_users(half)))
    del encoded[:]
    kept, counts = filters.apply_filters(records, cfg, cache_dir=cache)
    assert sorted(encoded) == sorted(set(_users(records)) - set(_users(half)))  # only the new turns
    assert kept == kept_ref and counts == counts_ref

    del encoded[:]
    kept, counts = filters.apply_filters(records, cfg, cache_dir=cache)
    assert encoded == [] and kept == kept_ref and counts == counts_ref
    # bit-identical vectors: cached rows (encoded in other runs, beside other texts) equal a fresh encode
    texts = _users(records)
    assert np.array_equal(filters.embed_turns(texts, cache), filters.embed_turns(texts))
    parts = sorted(os.listdir(cache))
    assert parts == ["part-00000.npz", "part-00001.npz"]  # append-only, no temporary file left

    # another encoder (name, package version or device) never reuses these vectors
    monkeypatch.setattr(filters, "encoder_id", lambda: "some-other-encoder")
    del encoded[:]
    filters.embed_turns(texts[:3], cache)
    assert encoded == list(dict.fromkeys(texts[:3]))


def test_embedding_cache_skips_a_damaged_part(tmp_path, encoded):
    cache = str(tmp_path / "cache")
    texts = ["The trip was cancelled and I feel awful.", "My dog is finally home again."]
    ref = filters.embed_turns(texts, cache)
    part = os.path.join(cache, "part-00000.npz")
    with open(part, "rb") as f:
        data = f.read()
    with open(part, "wb") as f:  # truncated (damaged on disk: the cache itself only renames whole parts)
        f.write(data[:len(data) // 2])
    del encoded[:]
    with pytest.warns(UserWarning, match="unreadable embedding cache part"):
        again = filters.embed_turns(texts, cache)
    assert encoded == texts and np.array_equal(again, ref)
    assert sorted(os.listdir(cache)) == ["part-00000.npz", "part-00001.npz"]  # the damaged part is not replaced


def test_sigterm_stops_saves_finished_dialogues_and_resumes(tmp_path, monkeypatch, encoded):
    monkeypatch.setenv("KARDIA_SYNTH_SALT", "test-salt")
    prof, seeds, extra = resume_inputs(tmp_path)
    out = str(tmp_path / "stopped")
    shards = os.path.join(out, "shards")
    cmd = [sys.executable, "-m", "kardia_rl.cli", "synthesize", "--profiles", prof, "--seeds", seeds, "--out", out,
           "--no-progress"]
    with SynthServer(delay=0.2) as slow:
        proc = subprocess.Popen(cmd + overrides(slow.url, **extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not glob.glob(os.path.join(shards, "shard-*.jsonl")):
            assert time.monotonic() < deadline, "no shard after 300 s"
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    lines = [ln for ln in err.splitlines() if "SIGTERM" in ln]
    assert len(lines) == 1 and f"re-run the same command with --out {out} to resume" in lines[0], err[-2000:]
    left = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
    assert left == []
    done = [json.loads(line) for f in sorted(glob.glob(os.path.join(shards, "shard-*.jsonl"))) for line in open(f)]
    assert 1 <= len(done) < 6 and not os.path.exists(os.path.join(out, "kardiabench.jsonl"))  # stopped early

    with SynthServer() as fresh:
        records = run_cli(prof, seeds, out, fresh.url, **extra)
        asked = [b["messages"][0]["content"] for b in fresh.bodies]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resumed_from_shards"] == len(done) and summary["dialogues_finished"] == 6
    # finished dialogues were not asked again
    assert not any(r["situation"] in s for r in done if "situation" in r for s in asked)
    with SynthServer() as ref_server:
        ref = run_cli(prof, seeds, str(tmp_path / "ref"), ref_server.url, **extra)
    assert [json.dumps(r, sort_keys=True) for r in records] == [json.dumps(r, sort_keys=True) for r in ref]

    # a re-run with nothing left to synthesise only re-filters, from the embedding cache
    del encoded[:]
    with SynthServer() as idle:
        assert run_cli(prof, seeds, out, idle.url, **extra) == records and idle.bodies == []
    assert encoded == []
