"""Chat backend for any OpenAI-compatible endpoint (vLLM serve, SGLang, a hosted API) over HTTP.

One `complete()` call sends one POST {api_base}/chat/completions per conversation, concurrently, and
returns a list aligned with the input holding the completion text or the Exception that request ended
with: a single failing request never raises (RubricJudge turns it into a counted fallback).

Robustness, because a judge endpoint under RL load is slow and flaky:
- bounded concurrency: at most `max_in_flight` HTTP requests in flight (per event loop);
- a per-attempt timeout (`timeout_s`, given by the factory from judge.timeout_s) covering connect, send and
  the whole reply, but not the wait for the rate limiter;
- ONE attempt per conversation: a failure comes back as a `ChatRequestError` saying whether it is worth a
  retry (timeouts, connection errors, 429, 5xx and malformed 200 replies are; any other 4xx is a request the
  server will never accept) and the 429's Retry-After; RubricJudge owns the retries (base.py: one budget per
  request, so transport retries never multiply with re-asks);
- an optional requests-per-minute limiter (ratelimit.RateLimiter; every attempt takes a token, because that
  is what the provider counts);
- the API key comes from the environment variable named by `api_key_env`; it is held in a private
  attribute, never logged, and redacted from every error message (a proxy may echo request headers).

`stats` (per attempt): requests (HTTP requests sent), failures (attempts that ended with an error),
timeouts / rate_limited (429) / http_errors / connection_errors, rate_wait_s (time spent waiting on the
limiter), latencies (seconds per successful request; a bounded window).

aiohttp sessions are bound to the event loop that created them, so one session is kept per loop (the
Ray judge actor uses one loop; tests call asyncio.run repeatedly). Call `close()` from each loop.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from typing import Optional, Sequence

import aiohttp

from kardia_rl.errors import ConfigError
from kardia_rl.rewards.judge.base import ChatBackend, ChatRequestError
from kardia_rl.rewards.judge.ratelimit import RateLimiter

log = logging.getLogger(__name__)

ERROR_BODY_CHARS = 300  # how much of an error reply is kept in the exception message
LATENCY_WINDOW = 4096  # latencies kept for percentiles (a bounded window: training runs for days)


class _Secret:
    """Holds the API key; prints as *** so that vars(), logging or a debugger dump never shows it."""
    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


class _LoopState:
    """What must belong to one event loop: the HTTP session and the in-flight semaphore."""

    def __init__(self, max_in_flight: int, timeout_s: float):
        self.semaphore = asyncio.Semaphore(max_in_flight)
        # The connector pool is sized like the semaphore so that it never becomes a second, hidden bound.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_in_flight),
            timeout=aiohttp.ClientTimeout(total=timeout_s))


def new_stats() -> dict:
    return {"requests": 0, "failures": 0, "timeouts": 0, "rate_limited": 0, "http_errors": 0,
            "connection_errors": 0, "rate_wait_s": 0.0,
            "latencies": collections.deque(maxlen=LATENCY_WINDOW)}


class OpenAIChatBackend(ChatBackend):
    name = "openai"

    def __init__(self, api_base: str, model: str, *, api_key: Optional[str] = None, max_in_flight: int = 16,
                 timeout_s: float = 60.0, requests_per_minute: float = 0, extra_body: Optional[dict] = None):
        if not api_base.startswith(("http://", "https://")):
            raise ConfigError(f"judge.api_base must be an http(s) URL, got {api_base!r}")
        for key, value, ok in (("max_in_flight", max_in_flight, max_in_flight >= 1),
                               ("timeout_s", timeout_s, timeout_s > 0),
                               ("requests_per_minute", requests_per_minute, requests_per_minute >= 0)):
            if not ok:
                raise ConfigError(f"judge.{key} has an invalid value {value!r} for the openai backend")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_in_flight, self.timeout_s = int(max_in_flight), float(timeout_s)
        self.extra_body = dict(extra_body or {})
        self.limiter = RateLimiter(requests_per_minute) if requests_per_minute > 0 else None
        self._api_key = _Secret(api_key) if api_key else None
        self.stats = new_stats()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}

    @classmethod
    def from_config(cls, cfg, *, timeout_s: float) -> "OpenAIChatBackend":
        """Build from kardia_rl.config.schema.JudgeConfig and the attempt timeout the factory decided; the key
        is read from os.environ[cfg.api_key_env]."""
        api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if not api_key:
            # Local servers (vLLM serve, SGLang) need no key; hosted APIs will answer 401, returned as an error.
            log.info("judge.api_key_env=%s is not set: sending requests without an API key", cfg.api_key_env)
        return cls(cfg.api_base, cfg.model, api_key=api_key, max_in_flight=cfg.max_in_flight,
                   timeout_s=timeout_s, requests_per_minute=cfg.requests_per_minute, extra_body=cfg.extra_body)

    def __repr__(self) -> str:
        return (f"OpenAIChatBackend(url={self.url!r}, model={self.model!r}, max_in_flight={self.max_in_flight}, "
                f"timeout_s={self.timeout_s}, limiter={self.limiter!r}, "
                f"api_key={'set' if self._api_key else 'unset'})")

    # ------------------------------------------------------------------ public API
    async def complete(self, conversations: Sequence[list[dict]], *, temperature: float, max_tokens: int,
                       seed: Optional[int] = None) -> list:
        """Texts (or Exceptions) aligned with `conversations`. Every conversation gets the same `seed`, so a
        completion depends on (conversation, seed) only, not on its position in the batch."""
        state = self._loop_state()
        return list(await asyncio.gather(*(self._complete_one(state, conv, temperature, max_tokens, seed)
                                           for conv in conversations)))

    async def close(self) -> None:
        """Close the session of the running loop and forget sessions whose loop has already closed."""
        loop = asyncio.get_running_loop()
        state = self._loops.pop(loop, None)
        if state is not None:
            await state.session.close()
        self._prune_closed_loops()

    # ------------------------------------------------------------------ internals
    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            self._prune_closed_loops()
            state = self._loops[loop] = _LoopState(self.max_in_flight, self.timeout_s)
        return state

    def _prune_closed_loops(self) -> None:
        # A session whose loop is closed cannot be awaited any more; dropping it is all that is left to do.
        for loop in [lp for lp in self._loops if lp.is_closed()]:
            del self._loops[loop]

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key.value}"
        return headers

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key.value, "***") if self._api_key else text

    def _payload(self, conv: list[dict], temperature: float, max_tokens: int, seed: Optional[int]) -> dict:
        body = dict(self.extra_body)
        body.update({"model": self.model, "messages": conv, "temperature": float(temperature),
                     "max_tokens": int(max_tokens)})
        if seed is not None:
            body["seed"] = int(seed)
        return body

    async def _complete_one(self, state: _LoopState, conv, temperature, max_tokens, seed):
        """One attempt: the text, or the ChatRequestError it ended with (RubricJudge decides on a retry)."""
        payload = self._payload(conv, temperature, max_tokens, seed)
        async with state.semaphore:
            if self.limiter is not None:
                self.stats["rate_wait_s"] += await self.limiter.acquire()
            start = time.monotonic()  # after the limiter: a queued request is not a slow one
            try:
                text = await self._attempt(state.session, payload)
            except Exception as e:  # noqa: BLE001 - a bug or odd input must fail this request only
                text = ChatRequestError(self._redact(f"judge request failed: {type(e).__name__}: {e}"),
                                        kind="internal")
        if isinstance(text, ChatRequestError):
            self.stats["failures"] += 1
            log.debug("judge request failed: %s", text)
            return text
        self.stats["latencies"].append(time.monotonic() - start)
        return text

    async def _attempt(self, session: aiohttp.ClientSession, payload: dict):
        """The completion text or a ChatRequestError."""
        self.stats["requests"] += 1
        try:
            async with session.post(self.url, json=payload, headers=self._headers()) as resp:
                body = await resp.text(errors="replace")
                if resp.status != 200:
                    return self._http_error(resp.status, body, resp.headers.get("Retry-After"))
                return self._parse_reply(body)
        except asyncio.TimeoutError:
            self.stats["timeouts"] += 1
            return ChatRequestError(f"judge request to {self.url} timed out after {self.timeout_s:g} s", kind="timeout")
        except aiohttp.ClientError as e:
            self.stats["connection_errors"] += 1
            msg = self._redact(f"{type(e).__name__}: {e}")
            return ChatRequestError(f"judge request to {self.url} failed: {msg}", kind="connection")

    def _http_error(self, status: int, body: str, retry_after: Optional[str]) -> ChatRequestError:
        self.stats["http_errors"] += 1
        retryable = status == 429 or status >= 500
        if status == 429:
            self.stats["rate_limited"] += 1
        snippet = self._redact(body[:ERROR_BODY_CHARS])
        return ChatRequestError(f"judge endpoint {self.url} answered HTTP {status}: {snippet}", kind="http",
                                status=status, retryable=retryable, retry_after_s=_parse_retry_after(retry_after))

    def _parse_reply(self, body: str):
        try:
            data = json.loads(body)
            content = data["choices"][0]["message"]["content"]
            if content is None:
                # A finished completion with no answer (e.g. a reasoning model that spent max_tokens
                # thinking): a judge failure for the parser to report, not a transport error to retry.
                content = ""
            if not isinstance(content, str):
                raise TypeError(f"message.content is {type(content).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            snippet = self._redact(body[:ERROR_BODY_CHARS])
            # A 200 that is not a chat completion is a proxy or server glitch: worth another try.
            return ChatRequestError(f"judge endpoint {self.url} sent a malformed reply ({e}): {snippet}",
                                    kind="bad_response")
        return content


def _parse_retry_after(value: Optional[str]) -> float:
    """Seconds from a Retry-After header (delta-seconds; HTTP dates are ignored: backoff applies)."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0
