"""utils/seeds.py: each named scheme gives exactly the value of the formula its callers wrote by hand before they
shared it (written out here), so routing them through derive_seed changed no seed and no order; split_even gives
the shares the rollout, synthesis and learner sharding computed."""
from __future__ import annotations

import hashlib
import random

import pytest

from kardia_rl.cluster.rollout import chunk_seed, contiguous_chunks
from kardia_rl.curriculum.crossfit import assign_folds
from kardia_rl.data.splits import _rank
from kardia_rl.engines.base import request_seed
from kardia_rl.evaluation.calibrate_fit import _fold, is_held_out
from kardia_rl.synth.roles import Request, chunks
from kardia_rl.utils.seeds import derive_seed, split_even

CASES = [(0, 0, 0), (1, 2, 3), (7, 19, 5), (2**31 - 1, 100000, 63), (123456789012, 4, 1)]


def test_colon56_is_the_rollout_chunk_seed_and_the_engine_request_seed():
    for seed, step, chunk in CASES:
        old = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{chunk}".encode()).digest()[:7], "big")
        assert chunk_seed(seed, step, chunk) == derive_seed(seed, step, chunk, scheme="colon56") == old
        old = int.from_bytes(hashlib.sha256(f"{seed}:{chunk}".encode()).digest()[:7], "big")
        assert request_seed(seed, chunk) == old < 2**56


def test_repr48_is_the_synthesis_chunk_seed():
    rng = random.Random(0)
    reqs = [Request(messages=[], seed=rng.randrange(2**40)) for _ in range(7)]
    for k in (1, 2, 3, 7, 9):
        bounds = [len(reqs) * i // k for i in range(k + 1)]
        old = [(i, bounds[i], bounds[i + 1],
                int(hashlib.sha256(repr([r.seed for r in reqs[bounds[i]:bounds[i + 1]]]).encode()).hexdigest()[:12], 16))
               for i in range(k) if bounds[i] < bounds[i + 1]]
        assert list(chunks(reqs, k)) == old


def test_unit256_orders_as_the_split_and_fold_hex_digests():
    keys = [f"dlg-{i:03d}" for i in range(40)]
    for seed in (0, 3):
        old = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\x1f{k}".encode()).hexdigest())
        assert sorted(keys, key=lambda k: _rank(k, seed)) == old
        old = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\x1ffold\x1f{k}".encode()).hexdigest())
        assert sorted(keys, key=lambda k: derive_seed(seed, "fold", k, scheme="unit256")) == old


def test_assign_folds_balances_in_hashed_order():
    class S:
        def __init__(self, d):
            self.dialogue_id, self.anon_username = d, "u"
    samples = [S(f"d{i % 9}") for i in range(30)]
    folds = assign_folds(samples, 3, "dialogue", seed=5)
    order = sorted({s.dialogue_id for s in samples},
                   key=lambda k: hashlib.sha256(f"5\x1ffold\x1f{k}".encode()).hexdigest())
    sizes, want = [0, 0, 0], {}
    for key in order:  # the assignment the hex-digest order gives
        f = min(range(3), key=lambda i: (sizes[i], i))
        want[key], sizes[f] = f, sizes[f] + sum(s.dialogue_id == key for s in samples)
    assert folds == want


def test_colon64_is_the_calibration_split_and_folds():
    for cid in ("ctx-1", "épitomé-22", "x"):
        h = hashlib.sha256(f"0:{cid}".encode("utf-8")).digest()
        assert is_held_out(cid, 0, 0.2) == (int.from_bytes(h[:8], "big") / 2.0 ** 64 < 0.2)
        h = hashlib.sha256(f"cv:{cid}".encode("utf-8")).digest()
        assert _fold(cid, 4) == int.from_bytes(h[:8], "big") % 4


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="seed scheme 'nope': choose one of colon56"):
        derive_seed(1, scheme="nope")


@pytest.mark.parametrize("n,k", [(0, 1), (1, 3), (7, 2), (10, 3), (16, 4), (5, 5)])
def test_split_even_covers_contiguously_with_sizes_within_one(n, k):
    shares = split_even(n, k)
    assert len(shares) == k and shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    sizes = [hi - lo for lo, hi in shares]
    assert max(sizes) - min(sizes) <= 1
    c = max(1, min(n, k))  # the rollout's old chunks, written out
    assert contiguous_chunks(n, k) == [list(range(n * i // c, n * (i + 1) // c)) for i in range(c)]
