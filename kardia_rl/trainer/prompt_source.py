"""Deterministic, resumable stream of training prompts.

Each epoch is a permutation of the samples drawn from `seed + epoch`, so the order depends only on the seed,
and the stream position is two integers (epoch, index). Checkpoints store that position; a resumed run draws
exactly the prompts the uninterrupted run would have drawn.
"""
from __future__ import annotations

import random
from typing import Generic, Sequence, TypeVar

T = TypeVar("T")


class PromptSource(Generic[T]):
    def __init__(self, samples: Sequence[T], batch_size: int, seed: int):
        if not samples:
            raise ValueError("PromptSource needs at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples, self.batch_size, self.seed = list(samples), batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[T]:
        """The next `batch_size` samples, continuing into the next epoch's permutation when one runs out."""
        out = []
        while len(out) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self.samples[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.samples) or state["seed"] != self.seed:
            raise ValueError(f"checkpoint prompt stream (n={state['n']}, seed={state['seed']}) does not match this run "
                             f"(n={len(self.samples)}, seed={self.seed}): the data or the seed changed")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)
