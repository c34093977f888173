"""The test harness itself (tests/conftest.py): the model cache is keyed by the builder's settings, and a test
using a Ray/DeepSpeed fixture without the `ray` marker stops the collection (the quick tier would grow silently)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import _cache_dir, pytest_collection_modifyitems


def test_cached_model_path_follows_the_settings(monkeypatch, tmp_path, tmp_path_factory):
    monkeypatch.setenv("KARDIA_TEST_CACHE", str(tmp_path))
    a = _cache_dir(tmp_path_factory, "sft", {"sft": {"lr": 5e-3}, "seed": 0})
    assert a == _cache_dir(tmp_path_factory, "sft", {"seed": 0, "sft": {"lr": 5e-3}})  # key order does not matter
    assert a != _cache_dir(tmp_path_factory, "sft", {"sft": {"lr": 1e-3}, "seed": 0})
    assert a.startswith(str(tmp_path / "sft-"))
    monkeypatch.delenv("KARDIA_TEST_CACHE")
    assert not _cache_dir(tmp_path_factory, "sft", {}).startswith(str(tmp_path / "sft-"))  # CI: a fresh temp dir


def _item(nodeid, fixtures, marked):
    return SimpleNamespace(nodeid=nodeid, fixturenames=fixtures,
                           get_closest_marker=lambda name: object() if marked and name == "ray" else None)


def test_ray_fixture_without_the_ray_marker_stops_collection():
    ok = [_item("t::a", ["sft_model_dir", "tmp_path"], True), _item("t::b", ["tiny_model_dir"], False)]
    pytest_collection_modifyitems(None, ok)
    with pytest.raises(pytest.UsageError, match=r"t::c"):
        pytest_collection_modifyitems(None, ok + [_item("t::c", ["ray_cluster"], False)])
