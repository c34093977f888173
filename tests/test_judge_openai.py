"""The `openai` chat backend against a scripted OpenAI-compatible server on 127.0.0.1 (tests/judge_server.py):
one attempt per call, with errors that say whether to retry; RubricJudge over it owns the retries.

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
from kardia_rl.rewards.judge.base import ChatRequestError, JudgeRequest
from kardia_rl.rewards.judge.openai_backend import OpenAIChatBackend
from kardia_rl.rewards.judge.rubric import RubricJudge
from kardia_rl.rewards.judge.ratelimit import RateLimiter

SECRET = "sk-test-5f1c9e0a-never-print-me"
TOL = 0.02  # seconds of slack for clock granularity between client and server timestamps


def conv(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are a strict judge."}, {"role": "user", "content": text}]


def backend(url: str, **kw) -> OpenAIChatBackend:
    args = dict(model="judge-test", max_in_flight=4, timeout_s=5.0)
    args.update(kw)
    return OpenAIChatBackend(url, **args)


def run(b: OpenAIChatBackend, convs, **kw):
    async def go():
        try:
            return await b.complete(convs, temperature=kw.get("temperature", 0.0), max_tokens=64, seed=kw.get("seed"))
        finally:
            await b.close()
    return asyncio.run(go())


def rubric(b: OpenAIChatBackend, **kw) -> RubricJudge:
    return RubricJudge(b, **{"max_retries": 3, "backoff_s": 0.0, "cache_size": 0, "max_tokens": 64, **kw})


def jreq(steps: str, key: str) -> JudgeRequest:
    return JudgeRequest(person="Mia, 34, nurse", situation="She lost her job.", history=(("user", "I feel useless."),),
                        response=f"That sounds heavy. {marker(steps, key)}", group_id="g")


def judge_all(judge, reqs):
    async def go():
        try:
            return await judge.judge(reqs)
        finally:
            await judge.close()
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
    assert b.stats["requests"] == 4 and b.stats["failures"] == 0
    assert len(b.stats["latencies"]) == 4 and all(x > 0 for x in b.stats["latencies"])


def test_one_attempt_per_call_and_errors_say_whether_to_retry(server):
    b = backend(server.url)
    e500, e400, bad, e429 = run(b, [conv(marker("500,ok", "r1")), conv(marker("400", "c1")),
                                    conv(marker("badjson,ok", "m1")), conv(marker("429@0.4,ok", "q1"))])
    assert isinstance(e500, ChatRequestError) and e500.kind == "http" and e500.status == 500 and e500.retryable
    assert isinstance(e400, ChatRequestError) and e400.status == 400 and not e400.retryable  # never accepted
    assert isinstance(bad, ChatRequestError) and bad.kind == "bad_response" and bad.retryable
    assert isinstance(e429, ChatRequestError) and e429.retryable and e429.retry_after_s == 0.4
    assert all(len(server.attempts(f"#{k}]]")) == 1 for k in ("r1", "c1", "m1", "q1"))
    assert (b.stats["requests"], b.stats["failures"], b.stats["http_errors"], b.stats["rate_limited"]) == (4, 4, 3, 1)


def test_timeout_is_one_counted_attempt(server):
    b = backend(server.url, timeout_s=0.25)
    (err,) = run(b, [conv(marker("delay=1.5", "t1"))])
    assert isinstance(err, ChatRequestError) and err.kind == "timeout" and err.retryable
    assert b.stats["timeouts"] == 1 and b.stats["failures"] == 1 and len(server.attempts("#t1]]")) == 1


def test_connection_error_is_returned_as_retryable(server):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    b = backend(f"http://127.0.0.1:{port}/v1", timeout_s=2.0)
    (err,) = run(b, [conv("hello")])
    assert isinstance(err, ChatRequestError) and err.kind in ("connection", "timeout") and err.retryable


def test_rubric_judge_retries_what_the_backend_marks_retryable(server):
    """500 then 503 then a judgment: three attempts; a 400: one; a 429's Retry-After is waited out."""
    judge = rubric(backend(server.url), max_retries=3)
    ok, bad, limited = judge_all(judge, [jreq("500,503,ok=3", "r2"), jreq("400", "c2"), jreq("429@0.4,ok", "q2")])
    assert ok.ok and set(ok.scores.values()) == {3.0} and ok.attempts == 3
    assert [a["attempt"] for a in server.attempts("#r2]]")] == [0, 1, 2]
    assert not bad.ok and "400" in bad.error and bad.attempts == 1 and len(server.attempts("#c2]]")) == 1
    first, second = server.attempts("#q2]]")
    assert limited.ok and second["t"] - first["t"] >= 0.4 - TOL
    assert judge.stats.retries == 3 and judge.stats.backend_errors == 4 and judge.stats.failures == 1


def test_factory_gives_the_timeout_to_the_transport_and_one_retry_budget_to_the_judge(server):
    """judge.timeout_s bounds each HTTP attempt and a timed-out attempt is retried by the judge; judge.max_retries
    is ONE budget per request for transport failures and re-asks together: a server alternating HTTP 500 and
    garbage sees max_retries + 1 requests (before, the backend retried each 500 inside every re-ask: 6 here)."""
    from kardia_rl.rewards.judge import make_judge

    judge = make_judge(JudgeConfig(backend="openai", api_base=server.url, model="judge-test", timeout_s=0.3,
                                   max_retries=2, backoff_s=0.0, cache_size=0, max_tokens=64))
    assert judge.chat.timeout_s == 0.3 and judge.max_retries == 2
    mixed, slow, late = judge_all(judge, [jreq(",".join(["500", "garbage"] * 3), "x1"), jreq("delay=1.5,ok=2", "x2"),
                                          jreq("500,garbage,ok=5", "x3")])
    assert not mixed.ok and mixed.attempts == 3 and len(server.attempts("#x1]]")) == 3
    assert slow.ok and slow.attempts == 2 and set(slow.scores.values()) == {2.0}
    assert late.ok and late.attempts == 3 and len(server.attempts("#x3]]")) == 3
    assert judge.stats.timeouts == 1 and judge.stats.parse_failures == 2 and judge.stats.retries == 2 + 1 + 2


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
                      max_in_flight=2)
    b = OpenAIChatBackend.from_config(cfg, timeout_s=5.0)
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
    the server sees max_retries + 1 attempts of each failing request."""
    judge = rubric(backend(server.url), max_retries=2)
    good, dead, garbage = judge_all(judge, [jreq("ok=5", "e1"), jreq("500", "e2"), jreq("garbage", "e3")])
    assert good.ok and set(good.scores.values()) == {5.0}
    assert not dead.ok and dead.fallback and "500" in dead.error and len(server.attempts("#e2]]")) == 3
    assert not garbage.ok and garbage.error.startswith("parse error") and len(server.attempts("#e3]]")) == 3
