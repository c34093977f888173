"""A bounded LRU cache of judgments.

GRPO samples N candidates per prompt and tiny or early policies often repeat themselves, and evaluation
re-scores the same references, so identical judge requests are common. The key is (rubric version hash,
person, situation, history, response) (`JudgeRequest.cache_key`): a rubric or prompt change bumps the
version hash, so stale judgments are never reused. Only successful judgments are stored, so a failure is
retried next time instead of being cached.

Keys are stored as SHA-256 digests (profiles and histories are long; a digest bounds memory per entry).
A `threading.Lock` makes it safe from several threads (the Ray actor's event loop plus executor threads);
no method awaits, so it is also safe from concurrent asyncio tasks.
"""
from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from typing import Optional

from kardia_rl.rewards.judge.base import Judgment


def _digest(key: tuple) -> str:
    return hashlib.sha256(json.dumps(key, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


class JudgmentCache:
    def __init__(self, max_size: int = 4096):
        if max_size < 0:
            raise ValueError(f"cache max_size must be >= 0, got {max_size}")
        self.max_size = max_size
        self._data: OrderedDict[str, Judgment] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Optional[Judgment]:
        """A copy of the stored judgment marked `cached=True` (latency 0), or None; counts hit/miss."""
        d = _digest(key)
        with self._lock:
            j = self._data.get(d)
            if j is None:
                self.misses += 1
                return None
            self._data.move_to_end(d)
            self.hits += 1
        out = copy.deepcopy(j)
        out.cached, out.latency_s = True, 0.0
        return out

    def put(self, key: tuple, judgment: Judgment) -> None:
        """Store a successful judgment (failed or fallback ones are ignored); evicts the least recently used."""
        if self.max_size == 0 or not judgment.ok or judgment.fallback:
            return
        d = _digest(key)
        stored = copy.deepcopy(judgment)
        stored.cached = False
        with self._lock:
            self._data[d] = stored
            self._data.move_to_end(d)
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)

    def record_hit(self) -> None:
        """Count a hit served outside `get` (a duplicate request answered by an in-flight judgment)."""
        with self._lock:
            self.hits += 1

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def stats(self) -> dict:
        return {"cache/size": len(self._data), "cache/hits": self.hits, "cache/misses": self.misses,
                "cache/hit_rate": self.hit_rate}
