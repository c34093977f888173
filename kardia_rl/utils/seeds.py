"""Hash-derived seeds and orders, and the even split of n items over k workers: one definition each.

Exact resume and "2 learner ranks equal 1" rest on every derived seed being a pure function of its parts, never
of which actor or thread served a request. Each scheme below is the formula one caller has always used (its
separator, its truncation), kept by name so that outputs stay bit-identical; merging schemes would change seeds
and therefore results, and is a deliberate change of its own.
"""
from __future__ import annotations

import hashlib


def _colon(parts) -> bytes:
    return ":".join(str(p) for p in parts).encode()


# scheme name -> (bytes hashed from the parts, digest -> int). The users of each scheme:
SCHEMES = {
    # a 56-bit engine seed: the rollout's per-(seed, step, chunk) call seed, an engine's per-(call seed, prompt)
    # request seed (vLLM gives the j-th of n samples seed + j, so seeds must be far apart: hashed, 56 bits)
    "colon56": (_colon, lambda d: int.from_bytes(d[:7], "big")),
    # a 64-bit draw of the judge calibration's held-out split (seed, context id) and its CV folds ("cv", id)
    "colon64": (_colon, lambda d: int.from_bytes(d[:8], "big")),
    # a 48-bit call seed of a synthesis chunk: of the repr of its requests' seeds (a list of ints)
    "repr48": (lambda parts: repr(list(parts)).encode(), lambda d: int(d.hex()[:12], 16)),
    # a sort key (the whole 256-bit digest, so its order is the hex digest's order): dialogue/profile order of the
    # data split and eval's subset (parts: seed, key), fold order of the cross-fitted split (seed, "fold", key)
    "unit256": (lambda parts: "\x1f".join(str(p) for p in parts).encode(), lambda d: int.from_bytes(d, "big")),
}


def derive_seed(*parts, scheme: str) -> int:
    """The seed (or sort key) of `parts` under `scheme`, a name in SCHEMES."""
    try:
        encode, reduce = SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"seed scheme {scheme!r}: choose one of {', '.join(SCHEMES)}") from None
    return reduce(hashlib.sha256(encode(parts)).digest())


def split_even(n: int, k: int) -> list[tuple[int, int]]:
    """(lo, hi) of each of k contiguous shares of range(n), sizes differing by at most one (earlier shares are
    the smaller); shares are empty when k > n."""
    bounds = [n * i // k for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]
