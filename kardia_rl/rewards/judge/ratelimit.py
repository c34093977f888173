"""A requests-per-minute limiter for external judge APIs (token bucket with reservations).

Hosted APIs enforce a requests-per-minute quota and answer 429 when it is exceeded; pacing on our side
keeps the judge from burning retries on 429s. The bucket holds at most `burst` tokens and refills at
`rpm / 60` tokens per second. `acquire()` *reserves* a token under a threading lock (the balance may go
negative: that is the queue of waiters) and then sleeps until its slot, so:

- the bound is exact: with burst 1, the k-th request of a batch starting at t0 is released no earlier
  than t0 + k * 60 / rpm, however the event loop schedules the waiters;
- it is shared by every event loop and thread using one backend (no asyncio primitive is bound to a loop);
- a cancelled waiter keeps its slot (the limiter errs on the slow side, never the fast one).
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Awaitable, Callable

from kardia_rl.errors import ConfigError


class RateLimiter:
    """Token bucket: `rate_per_minute` requests per minute, at most `burst` sent back to back."""

    def __init__(self, rate_per_minute: float, burst: int = 1, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if not rate_per_minute > 0:
            raise ConfigError(f"judge.requests_per_minute must be > 0 to build a limiter, got {rate_per_minute!r}")
        if burst < 1:
            raise ConfigError(f"rate limiter burst must be >= 1, got {burst!r}")
        self.rate_per_minute = float(rate_per_minute)
        self.burst = int(burst)
        self._rate = self.rate_per_minute / 60.0  # tokens per second
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)  # a fresh limiter may send a full burst at once
        self._stamp = clock()

    @property
    def spacing_s(self) -> float:
        """Minimum seconds between two requests once the burst is spent."""
        return 1.0 / self._rate

    def reserve(self) -> float:
        """Take one token now; return how many seconds the caller must wait before using it."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    async def acquire(self) -> float:
        """Wait for a request slot; returns the seconds waited (for stats)."""
        delay = self.reserve()
        if delay > 0:
            await self._sleep(delay)
        return delay

    def __repr__(self) -> str:
        return f"RateLimiter(rate_per_minute={self.rate_per_minute:g}, burst={self.burst})"
