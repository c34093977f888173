"""A bounded LRU cache of judgments.

GRPO samples N candidates per prompt and tiny or early policies often repeat themselves, and evaluation
re-scores the same references, so identical judge requests are common. The key is `JudgeRequest.cache_key`:
("single", rubric version hash, person, situation, history, response) for a candidate judged alone, and
("group", ..., sorted sibling responses, response) for one judged next to its siblings, so single and
group judgments never share an entry and a group score is reused only for the same sibling set (`get_all`
serves a whole group or nothing). A rubric or prompt change bumps the version hash, so stale judgments are
never reused. Only successful judgments are stored, so a failure is retried next time instead of being
cached.

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
from typing import Optional, Sequence

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

    def get_all(self, keys: Sequence[tuple]) -> Optional[list[Judgment]]:
        """Copies of the judgments of every key (marked cached), or None if any is missing: a judged group is
        served whole or re-judged whole, never mixed from two calls. Counts one hit or miss per key."""
        digests = [_digest(k) for k in keys]
        with self._lock:
            found = [self._data.get(d) for d in digests]
            if any(j is None for j in found):
                self.misses += len(keys)
                return None
            for d in digests:
                self._data.move_to_end(d)
            self.hits += len(keys)
        out = [copy.deepcopy(j) for j in found]
        for j in out:
            j.cached, j.latency_s = True, 0.0
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
