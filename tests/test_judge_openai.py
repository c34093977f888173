"""The `openai` chat backend against a scripted OpenAI-compatible server on 127.0.0.1 (tests/judge_server.py).

Timing assertions are only lower bounds that the code guarantees (a rate limit, a Retry-After), never
speed limits, so a loaded machine cannot make them fail.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest

from judge_server import ScriptedJudgeServer, judgment_text, marker
from kardia_rl.config.schema import JudgeConfig
from kardia_rl.errors import ConfigError
from kardia_rl.rewards.judge.openai_backend import ChatRequestError, OpenAIChatBackend
from kardia_rl.rewards.judge.ratelimit import RateLimiter

SECRET = "sk-test-5f1c9e0a-never-print-me"
TOL = 0.02  # seconds of slack for clock granularity between client and server timestamps


def conv(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are a strict judge."}, {"role": "user", "content": text}]


def backend(url: str, **kw) -> OpenAIChatBackend:
    args = dict(model="judge-test", max_in_flight=4, timeout_s=5.0, max_retries=3, backoff_s=0.01)
    args.update(kw)
    return OpenAIChatBackend(url, **args)


def run(b: OpenAIChatBackend, convs, **kw):
    async def go():
        try:
            return await b.complete(convs, temperature=kw.get("temperature", 0.0), max_tokens=64, seed=kw.get("seed"))
        finally:
            await b.close()
    return asyncio.run(go())


@pytest.fixture(scope="module")
def server():
    with ScriptedJudgeServer() as srv:
        yield srv


def test_success_payload_and_alignment(server):
    b = backend(server.url)
    out = run(b, [conv(marker("ok=5", "a1")), conv(marker("garbage", "a2")), conv(marker("ok=2", "a3")),
                  conv(marker("null", "a4"))], seed=7)
    assert out[0] == judgment_text(5) and out[2] == judgment_text(2)
    assert isinstance(out[1], str) and "score" not in out[1]  # garbage is returned; the parser rejects it
    assert out[3] == ""  # no answer is the parser's failure to report, not a transport error to retry
    body = server.attempts("#a1]]")[0]["body"]
    assert body["model"] == "judge-test" and body["temperature"] == 0.0 and body["max_tokens"] == 64
    assert body["seed"] == 7 and body["messages"] == conv(marker("ok=5", "a1"))
    assert b.stats["requests"] == 4 and b.stats["attempts"] == 4 and b.stats["failures"] == 0
    assert len(b.stats["latencies"]) == 4 and all(x > 0 for x in b.stats["latencies"])


def test_500_twice_then_success_is_retried(server):
    b = backend(server.url, max_retries=3)
    out = run(b, [conv(marker("500,503,ok=3", "r1"))])
    assert out == [judgment_text(3)]
    assert [a["attempt"] for a in server.attempts("#r1]]")] == [0, 1, 2]
    assert b.stats["retries"] == 2 and b.stats["attempts"] == 3 and b.stats["http_errors"] == 2
    assert b.stats["failures"] == 0


def test_persistent_500_fails_after_max_retries(server):
    b = backend(server.url, max_retries=2)
    (err,) = run(b, [conv(marker("500", "r2"))])
    assert isinstance(err, ChatRequestError) and err.kind == "http" and err.status == 500 and err.attempts == 3
    assert len(server.attempts("#r2]]")) == 3 and b.stats["failures"] == 1 and b.stats["retries"] == 2


def test_400_is_not_retried(server):
    b = backend(server.url, max_retries=3)
    out = run(b, [conv(marker("400", "c1")), conv(marker("ok", "c2"))])
    assert isinstance(out[0], ChatRequestError) and out[0].status == 400 and out[0].attempts == 1
    assert out[1] == judgment_text(4)
    assert len(server.attempts("#c1]]")) == 1 and b.stats["retries"] == 0 and b.stats["failures"] == 1


def test_timeout_fails_after_retries_and_is_counted(server):
    b = backend(server.url, timeout_s=0.25, max_retries=1)
    (err,) = run(b, [conv(marker("delay=1.5", "t1"))])
    assert isinstance(err, ChatRequestError) and err.kind == "timeout" and err.attempts == 2
    assert b.stats["timeouts"] == 2 and b.stats["failures"] == 1 and b.stats["retries"] == 1
    assert len(server.attempts("#t1]]")) == 2


def test_malformed_reply_is_retried_then_returned_as_error(server):
    b = backend(server.url, max_retries=1)
    out = run(b, [conv(marker("badjson", "m1")), conv(marker("badjson,ok=1", "m2"))])
    assert isinstance(out[0], ChatRequestError) and out[0].kind == "bad_response"
    assert out[1] == judgment_text(1)


def test_429_honours_retry_after(server):
    b = backend(server.url, max_retries=2, backoff_s=0.0)
    out = run(b, [conv(marker("429@0.4,ok", "q1"))])
    assert out == [judgment_text(4)]
    first, second = server.attempts("#q1]]")
    assert second["t"] - first["t"] >= 0.4 - TOL
    assert b.stats["rate_limited"] == 1 and b.stats["retries"] == 1


def test_connection_error_is_retried_and_returned(server):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    b = backend(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout_s=2.0)
    (err,) = run(b, [conv("hello")])
    assert isinstance(err, ChatRequestError) and err.kind in ("connection", "timeout") and err.attempts == 2


def test_concurrency_bound(server):
    b = backend(server.url, max_in_flight=3)
    out = run(b, [conv(marker("delay=0.3", f"k{i}")) for i in range(10)])
    assert all(o == judgment_text(4) for o in out)
    peak = server.peak_overlap("#k")
    assert 2 <= peak <= 3  # the bound holds, and requests really did overlap


def test_rate_limit_spacing(server):
    rpm, n = 600, 6  # one request per 0.1 s
    b = backend(server.url, requests_per_minute=rpm, max_in_flight=8)
    t0 = time.monotonic()
    out = run(b, [conv(marker("ok", f"rl{i}")) for i in range(n)])
    assert all(o == judgment_text(4) for o in out)
    times = sorted(a["t"] for a in server.arrivals if "#rl" in a["key"])
    spacing = 60.0 / rpm
    # The limiter releases the k-th request of a batch no earlier than its start + k * spacing.
    for k, t in enumerate(times):
        assert t - t0 >= k * spacing - TOL, (k, t - t0)
    assert b.stats["rate_wait_s"] > 0


def test_rate_limiter_with_fake_clock():
    now = [100.0]
    slept = []

    async def fake_sleep(s):
        slept.append(s)
    lim = RateLimiter(120, burst=2, clock=lambda: now[0], sleep=fake_sleep)
    assert [lim.reserve() for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]  # burst of 2, then 0.5 s apart
    now[0] += 10.0  # a long idle refills to the burst, not beyond
    assert [lim.reserve() for _ in range(3)] == [0.0, 0.0, 0.5]
    asyncio.run(lim.acquire())
    assert slept == [1.0]
    with pytest.raises(ConfigError):
        RateLimiter(0)


def test_api_key_sent_but_never_printed(server, monkeypatch, caplog):
    monkeypatch.setenv("KARDIA_TEST_JUDGE_KEY", SECRET)
    cfg = JudgeConfig(backend="openai", api_base=server.url, model="judge-test", api_key_env="KARDIA_TEST_JUDGE_KEY",
                      max_retries=1, backoff_s=0.01, timeout_s=5.0, max_in_flight=2)
    b = OpenAIChatBackend.from_config(cfg)
    with caplog.at_level(logging.DEBUG):
        out = run(b, [conv(marker("ok", "s1")), conv(marker("400", "s2")), conv(marker("500", "s3"))])
    assert server.attempts("#s1]]")[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert out[0] == judgment_text(4)
    # The 400 body echoes the Authorization header: the error must carry it redacted.
    assert "echo_authorization" in str(out[1]) and "Bearer ***" in str(out[1])
    printed = [str(out[1]), repr(out[1]), str(out[2]), repr(out[2]), repr(b), str(b), str(vars(b)), caplog.text,
               json.dumps({k: v for k, v in b.stats.items() if k != "latencies"})]
    assert all(SECRET not in p for p in printed)


def test_one_backend_across_event_loops(server):
    b = backend(server.url)
    assert run(b, [conv(marker("ok=1", "l1"))]) == [judgment_text(1)]
    assert run(b, [conv(marker("ok=2", "l2"))]) == [judgment_text(2)]  # a new loop gets its own session
    assert b.stats["requests"] == 2


def test_make_chat_backend_builds_this_backend(server):
    from kardia_rl.rewards.judge import make_chat_backend

    b = make_chat_backend(JudgeConfig(backend="openai", api_base=server.url, model="judge-test", max_retries=0))
    assert isinstance(b, OpenAIChatBackend) and b.url == server.url + "/chat/completions"
    assert run(b, [conv(marker("ok=3", "mk"))]) == [judgment_text(3)]


def test_bad_config_raises_config_error():
    with pytest.raises(ConfigError, match="api_base"):
        OpenAIChatBackend("127.0.0.1:8000/v1", "m")
    with pytest.raises(ConfigError, match="max_in_flight"):
        OpenAIChatBackend("http://127.0.0.1:1/v1", "m", max_in_flight=0)


def test_rubric_judge_over_the_openai_backend(server):
    """End to end with RubricJudge: a scored answer, a dead endpoint and garbage; no exception escapes and
    transport retries are the backend's alone (the server sees max_retries + 1 attempts, not their square)."""
    from kardia_rl.rewards.judge.base import JudgeRequest
    from kardia_rl.rewards.rubric import RubricJudge

    b = backend(server.url, max_retries=2, backoff_s=0.0)
    judge = RubricJudge(b, max_retries=2, backoff_s=0.0, timeout_s=5.0, cache_size=0, max_tokens=64)

    def req(steps, key):
        return JudgeRequest(person="Mia, 34, nurse", situation="She lost her job.", history=(("user", "I feel useless."),),
                            response=f"That sounds heavy. {marker(steps, key)}", group_id="g")

    async def go():
        try:
            return await judge.judge([req("ok=5", "e1"), req("500", "e2"), req("garbage", "e3")])
        finally:
            await judge.close()
    good, dead, garbage = asyncio.run(go())
    assert good.ok and set(good.scores.values()) == {5.0}
    assert not dead.ok and dead.fallback and "500" in dead.error and len(server.attempts("#e2]]")) == 3
    assert not garbage.ok and garbage.error.startswith("parse error") and len(server.attempts("#e3]]")) == 3
