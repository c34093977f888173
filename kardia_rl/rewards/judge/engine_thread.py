"""A dedicated thread that owns a blocking generation engine and merges concurrent requests into batches.

Used by the in-process judge backends (vllm_backend, hf_backend). Why a thread of its own:
- `vllm.LLM` and a transformers model are blocking and not safe to drive from two threads at once; running
  every call (construction, generation, shutdown) on one thread is the lock, and it keeps the event loop
  of the judge actor free to accept new requests while a batch generates;
- the judge pool calls `complete()` as soon as each candidate is generated, i.e. many small concurrent
  calls. Running them one by one would give the engine batches of one; instead, every submission that
  arrives while a batch is generating is queued and the next batch takes all of them (continuous
  batching at the granularity of engine calls).

It is loop-agnostic: results come back through concurrent.futures, wrapped for whichever event loop awaits.
If a merged batch raises, each item is run alone so that one bad request (e.g. a prompt longer than the
model's context) fails only itself.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable, Optional, Sequence

from kardia_rl.rewards.judge.base import ChatRequestError

log = logging.getLogger(__name__)

_STOP = object()
DEFAULT_CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}  # Qwen3 judges: answer the JSON, no <think> block
LATENCY_WINDOW = 4096  # latencies kept for percentiles (a bounded window: training runs for days)


def engine_stats() -> dict:
    """Counters of the in-process backends (vllm, hf); tokens_per_s() derives throughput from them."""
    return {"requests": 0, "failures": 0, "batches": 0, "prompt_tokens": 0, "generated_tokens": 0,
            "generate_s": 0.0, "latencies": collections.deque(maxlen=LATENCY_WINDOW)}


def tokens_per_s(stats: dict) -> float:
    return stats["generated_tokens"] / stats["generate_s"] if stats["generate_s"] > 0 else 0.0


class EngineThread:
    def __init__(self, name: str):
        self._queue: "queue.Queue[tuple]" = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable, *args, **kwargs) -> Any:
        """Run `fn` on the engine thread and wait for it (construction, shutdown); re-raises its error."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("call", (fn, args, kwargs), fut))
        return fut.result()

    async def acall(self, fn: Callable, *args, **kwargs) -> Any:
        """`call` for coroutines: waits without blocking the event loop."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("call", (fn, args, kwargs), fut))
        return await asyncio.wrap_future(fut)

    async def run_batch(self, batch_fn: Callable[[list], list], items: Sequence) -> list:
        """Run `batch_fn` over `items`, merged with other pending submissions of the same `batch_fn`.

        `batch_fn(items) -> list` aligned with items (entries may be Exceptions). Never raises for a failing
        item: a batch that raises is retried item by item and each item's own exception is returned."""
        if not items:
            return []
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("batch", (batch_fn, list(items)), fut))
        return await asyncio.wrap_future(fut)

    def close(self, timeout_s: float = 60.0) -> None:
        """Finish the queued work, then stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put((_STOP, None, None))
        self._thread.join(timeout=timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    # ------------------------------------------------------------------ the thread
    def _put(self, job: tuple) -> None:
        if self._closed:
            raise RuntimeError("the judge engine has been closed")
        self._queue.put(job)

    def _main(self) -> None:
        pending = None  # a job taken from the queue while merging that must run next
        while True:
            job = pending if pending is not None else self._queue.get()
            pending = None
            kind, payload, fut = job
            if kind is _STOP:
                self._fail_queued()
                return
            if kind == "call":
                fn, args, kwargs = payload
                self._resolve(fut, fn, *args, **kwargs)
                continue
            batch_fn, items = payload
            jobs = [(items, fut)]
            while True:  # merge every queued submission for the same engine function
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt[0] == "batch" and nxt[1][0] == batch_fn:
                    jobs.append((nxt[1][1], nxt[2]))
                else:
                    pending = nxt
                    break
            self._run_merged(batch_fn, jobs)

    @staticmethod
    def _resolve(fut, fn, *args, **kwargs) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            fut.set_exception(e)

    def _run_merged(self, batch_fn, jobs: list) -> None:
        merged = [item for items, _ in jobs for item in items]
        try:
            results = batch_fn(merged)
            if len(results) != len(merged):
                raise RuntimeError(f"engine returned {len(results)} results for {len(merged)} requests")
        except Exception as e:  # noqa: BLE001 - isolate the failing request(s)
            log.warning("judge engine batch of %d failed (%s: %s); running its requests one by one",
                        len(merged), type(e).__name__, e)
            results = [self._run_alone(batch_fn, item) for item in merged]
        start = 0
        for items, fut in jobs:
            if fut.set_running_or_notify_cancel():
                fut.set_result(results[start:start + len(items)])
            start += len(items)

    @staticmethod
    def _run_alone(batch_fn, item):
        try:
            (result,) = batch_fn([item])
            return result
        except Exception as e:  # noqa: BLE001 - the request's own failure, returned to its caller
            return e

    def _fail_queued(self) -> None:
        while True:
            try:
                _, _, fut = self._queue.get_nowait()
            except queue.Empty:
                return
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("the judge engine has been closed"))


async def complete_on_engine(engine: "EngineThread", generate, stats: dict, conversations, *, temperature: float,
                             max_tokens: int, seed, timeout_s: Optional[float] = None) -> list:
    """The `ChatBackend.complete` body shared by the in-process backends (vllm, hf): validate, run the batch on
    the engine thread (failures come back per item as exceptions; past `timeout_s` every item is a timeout
    ChatRequestError, and the batch is cancelled if it has not started), and count requests, failures and
    latency."""
    import time

    if max_tokens < 1 or temperature < 0:
        raise ValueError(f"need max_tokens >= 1 and temperature >= 0, got {max_tokens}, {temperature}")
    start = time.monotonic()
    items = [(list(c), float(temperature), int(max_tokens), seed) for c in conversations]
    try:
        results = await asyncio.wait_for(engine.run_batch(generate, items), timeout_s)
    except asyncio.TimeoutError:
        results = [ChatRequestError(f"judge engine batch timed out after {timeout_s:g} s", kind="timeout")
                   for _ in items]
    done = time.monotonic() - start
    stats["requests"] += len(results)
    stats["failures"] += sum(isinstance(r, Exception) for r in results)
    stats["latencies"].extend(done for r in results if not isinstance(r, Exception))
    return results
