"""A scripted OpenAI-compatible chat server for testing the `openai` judge backend on 127.0.0.1.

Each request's reply is scripted by a marker in the content of its last message that has one (a judge's
re-ask appends a message without it and keeps the script going):

    [[judge:500,500,ok#r1]]

The steps before `#` are used one per attempt of that request (the last step repeats), so the example
answers HTTP 500 twice and then a valid judgment; `#r1` only makes the key unique. Requests are told apart
by the whole marker. No marker means `ok`. Steps:

    ok | ok=N      200 with a valid judgment (all five scores N, default 4) as message content; when the
                   prompt quotes the candidate with an `id=NONCE` marker (rewards/judge/rubric_prompt.py), the
                   judgment carries `"id": NONCE` as RubricJudge's injection-proof parser requires
    garbage        200 whose content is text no rubric parser can read
    null           200 whose message content is null (a reasoning model that ran out of tokens)
    badjson        200 whose body is not JSON at all
    delay=S        sleep S seconds, then answer like `ok`
    NNN | 429@S    that HTTP status with a JSON error body; `429@S` adds `Retry-After: S`;
                   a 4xx body echoes the request's Authorization header (as careless proxies do), so
                   tests can check that the client redacts it

`ScriptedJudgeServer(prompt_scores=True)` makes `ok` (without =N) an LLM-like judge whose five scores are a
hash of the request's whole message text and its `seed`: any change of the prompt (e.g. another nonce)
or of the sampling seed changes the scores, as with a real sampling judge.

The server runs its own event loop in a background thread (so client-side work cannot delay its
timestamps) and records every arrival (monotonic time, key, attempt number, headers, JSON body) and when it
replied, so a test can compute how many of its requests were in flight at once.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import threading
import time

from aiohttp import web

from kardia_rl.config.schema import RUBRIC_DIMENSIONS as DIMENSIONS  # the judge contract the server plays

MARKER = re.compile(r"\[\[judge:([^\]#]*)(?:#[^\]]*)?\]\]")
NONCE = re.compile(r"\bid=([A-Za-z0-9_-]+)")


def marker(steps: str, key: str = "") -> str:
    return f"[[judge:{steps}#{key}]]" if key else f"[[judge:{steps}]]"


def judgment_text(score=4, nonce: str = "") -> str:
    """A judgment with every dimension at `score`, or at `score[d]` when `score` is a dict."""
    body = {d: {"score": score[d] if isinstance(score, dict) else score, "rationale": f"{d} looks fine"}
            for d in DIMENSIONS}
    return json.dumps({"id": nonce, **body} if nonce else body)


def prompt_hash_scores(body: dict) -> dict:
    """1-5 per dimension from a hash of the request's messages and seed (prompt_scores mode)."""
    h = hashlib.sha256(json.dumps([body["messages"], body.get("seed")], sort_keys=True).encode()).digest()
    return {d: 1 + h[k] % 5 for k, d in enumerate(DIMENSIONS)}


def completion_body(content: str, model: str) -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def storm_step(storm: dict, key: str, attempt: int) -> str:
    """The step a `storm` server plays for attempt `attempt` of the request with content hash `key`: a fixed
    function of both, so a run is reproducible while each retry draws afresh."""
    u = int.from_bytes(hashlib.sha256(f"{key}:{attempt}".encode()).digest()[:8], "big") / 2.0 ** 64
    for step in ("500", "garbage"):
        if u < storm.get(step, 0.0):
            return step
        u -= storm.get(step, 0.0)
    return f"delay={storm['delay']}" if storm.get("delay") else "ok"


class LoopbackServer:
    """An aiohttp app on 127.0.0.1 (a free port) with its own event loop in a background thread, so client-side
    work cannot delay its replies or timestamps. Subclasses implement `_handle` for POST /v1/chat/completions."""

    thread_name = "loopback-server"

    def __init__(self):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.thread_name, daemon=True)
        self._runner = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


class ScriptedJudgeServer(LoopbackServer):
    thread_name = "judge-server"

    def __init__(self, prompt_scores: bool = False, storm: dict | None = None):
        """`storm` (e.g. {"500": 0.3, "garbage": 0.2, "delay": 0.02}): requests without a marker answer HTTP 500 or
        garbage with those probabilities per attempt, else a judgment after `delay` seconds (see storm_step)."""
        self.prompt_scores = prompt_scores
        self.storm = storm
        self.arrivals: list[dict] = []
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__()

    def attempts(self, key_fragment: str) -> list[dict]:
        """Arrivals whose marker contains `key_fragment`, in arrival order."""
        with self._lock:
            return [a for a in self.arrivals if key_fragment in a["key"]]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.json()
        contents = [str(m.get("content", "")) for m in body["messages"]]
        found = next((f for f in map(MARKER.search, reversed(contents)) if f), None)
        key = found.group(0) if found else ""
        steps = (found.group(1) if found else "ok").split(",")
        if not found and self.storm:  # one key per conversation (re-asks included: they extend the messages)
            key = "storm:" + hashlib.sha256(json.dumps(body["messages"][:2], sort_keys=True).encode()).hexdigest()[:16]
        with self._lock:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            step = storm_step(self.storm, key, attempt) if key.startswith("storm:") else \
                steps[min(attempt, len(steps) - 1)].strip()
            record = {"t": arrived, "t_end": None, "key": key, "attempt": attempt, "headers": dict(request.headers),
                      "body": body, "step": step}
            self.arrivals.append(record)
        try:
            return await self._reply(step, request, body)
        finally:
            with self._lock:
                record["t_end"] = time.monotonic()

    def peak_overlap(self, key_fragment: str) -> int:
        """Most requests matching `key_fragment` the server was handling at one moment.

        Computed from each request's [arrival, reply) interval, so requests of other tests that are still
        being handled (a client that timed out does not stop the server's sleep) do not count."""
        events = []
        for a in self.attempts(key_fragment):
            events += [(a["t"], 1), (a["t_end"] if a["t_end"] is not None else float("inf"), -1)]
        peak = cur = 0
        for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # at equal times, a finish precedes a start
            cur += step
            peak = max(peak, cur)
        return peak

    async def _reply(self, step: str, request: web.Request, body: dict) -> web.StreamResponse:
        model = body.get("model", "")
        nonce = next((f.group(1) for f in map(NONCE.search, (str(m.get("content", "")) for m in body["messages"]))
                      if f), "")
        if step.startswith("delay="):
            await asyncio.sleep(float(step.split("=", 1)[1]))
            step = "ok"
        if step == "ok" or step.startswith("ok="):
            score = int(step.split("=", 1)[1]) if "=" in step else (
                prompt_hash_scores(body) if self.prompt_scores else 4)
            return web.json_response(completion_body(judgment_text(score, nonce), model))
        if step == "garbage":
            return web.json_response(completion_body("br used ser attribute complexruct sws floor of herself", model))
        if step == "null":
            return web.json_response(completion_body(None, model))
        if step == "badjson":
            return web.Response(text="<html>502 upstream hiccup</html>", content_type="text/html")
        status, _, retry_after = step.partition("@")
        headers = {"Retry-After": retry_after} if retry_after else {}
        error = {"error": {"message": f"scripted status {status}", "type": "scripted",
                           "echo_authorization": request.headers.get("Authorization", "")}}
        return web.json_response(error, status=int(status), headers=headers)
