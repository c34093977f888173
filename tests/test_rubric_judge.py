"""RubricJudge (rewards/judge/rubric.py) behind a scripted chat backend: score aggregation, bounded concurrency,
re-asks, failures/timeouts/backoff counted and never raised, one retry budget per request, group-wise judging. No
model."""
import asyncio
import re

import pytest
from conftest import (
    DIMENSIONS, JudgeRequest, ScriptedChat, ans, honest_json, judge_requests, make_reward, reward_sample,
)

from kardia_rl.rewards import RubricJudge, aggregate_scores
from kardia_rl.rewards.judge.base import ChatRequestError


def test_aggregate_scores():
    assert aggregate_scores({d: 5 for d in DIMENSIONS}) == 1.0
    assert aggregate_scores({d: 1 for d in DIMENSIONS}) == 0.0
    s = dict(relevance=5, fluency=3, empathy=4, persona_consistency=1, safety=2)
    assert aggregate_scores(s) == pytest.approx((1 + 0.5 + 0.75 + 0 + 0.25) / 5)
    w = dict(relevance=2, fluency=0, empathy=1, persona_consistency=1, safety=0)
    assert aggregate_scores(s, w) == pytest.approx((2 * 1 + 0.75 + 0) / 4)
    assert aggregate_scores({**s, "safety": None}) is None  # a missing weighted dim never aggregates silently
    assert aggregate_scores({**s, "safety": None}, w) is not None  # ... unless its weight is 0
    assert aggregate_scores({**s, "relevance": 9}) == aggregate_scores({**s, "relevance": 5})  # clamped


def test_rubric_judge_scores_and_bounds_concurrency():
    chat = ScriptedChat(delay=0.01)
    judge = RubricJudge(chat, max_in_flight=3, backoff_s=0.0)
    out = asyncio.run(judge.judge(judge_requests(10)))
    assert all(j.ok and not j.fallback and j.attempts == 1 for j in out)
    for r, j in zip(judge_requests(10), out):
        assert j.scores == {d: float(1 + (len(r.response) + k) % 5) for k, d in enumerate(DIMENSIONS)}
    assert chat.calls == 10 and chat.peak == 3
    assert judge.stats.as_dict()["judge/requests"] == 10


def test_reask_after_parse_failure_then_success():
    chat = ScriptedChat(lambda i, conv: "I think it is fine." if i == 0 else honest_json(conv, conv[1]["content"]))
    judge = RubricJudge(chat, backoff_s=0.0)
    [j] = asyncio.run(judge.judge(judge_requests(1)))
    assert j.ok and j.attempts == 2 and judge.stats.parse_failures == 1 and judge.stats.retries == 1
    second = chat.convs[1]
    assert second[-2] == {"role": "assistant", "content": "I think it is fine."}
    assert "could not be used" in second[-1]["content"] and second[1] == chat.convs[0][1]


def test_failures_timeouts_and_backoff_are_counted_never_raised(monkeypatch):
    sleeps = []
    real_sleep = asyncio.sleep

    async def fake_sleep(t, *a, **k):
        sleeps.append(t)
        await real_sleep(0)

    def behave(i, conv):
        resp = conv[1]["content"]
        if "reply number 1!" in resp:
            return ConnectionError("http 500")  # raised by the backend
        if "reply number 2!!" in resp:
            return ValueError("returned as an exception instance")
        if "reply number 3!!!" in resp:
            return "garbage without scores"
        return honest_json(conv)

    class SlowForZero(ScriptedChat):
        async def complete(self, conversations, **kw):
            if "reply number 0\n" in conversations[0][1]["content"]:
                raise TimeoutError("the backend's attempt timed out")  # the backend owns the attempt timeout
            return await super().complete(conversations, **kw)

    chat = SlowForZero(behave)
    judge = RubricJudge(chat, max_retries=2, backoff_s=0.1)
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    out = asyncio.run(judge.judge(judge_requests(5)))
    monkeypatch.setattr(asyncio, "sleep", real_sleep)
    assert [j.ok for j in out] == [False, False, False, False, True]
    assert all(j.fallback and all(v is None for v in j.scores.values()) for j in out[:4])
    assert "timeout" in out[0].error and "ConnectionError" in out[1].error and "ValueError" in out[2].error
    assert "parse error" in out[3].error and out[3].raw == "garbage without scores"
    assert all(j.attempts == 3 for j in out[:4])
    st = judge.stats
    assert (st.failures, st.timeouts, st.parse_failures, st.retries) == (4, 3, 3, 8)
    assert st.backend_errors == 6
    waits = sorted(s for s in sleeps if s > 0)  # exponential backoff per request, jittered to 50-100 %
    assert len(waits) == 8 and all(0.05 <= w <= 0.1 for w in waits[:4]) and all(0.1 <= w <= 0.2 for w in waits[4:])
    # through the unified reward: counted neutral fallbacks, no exception
    r = make_reward(RubricJudge(SlowForZero(behave), max_retries=0))
    comps = [ans(response=q.response) for q in judge_requests(5)]
    res = asyncio.run(r.score([reward_sample()] * 5, comps, ["g"] * 5))
    assert r.stats["fallbacks"] == 4 and r.stats["judge_failures"] == 4
    assert all(b.rubric == pytest.approx(res[4].rubric) for b in res)


def test_one_retry_budget_per_request_whatever_fails():
    """Transport failures and re-asks share max_retries (before, a backend with a `max_retries` attribute was
    probed and then retried transport failures inside every re-ask); a failure the backend marks final ends
    the request at once; the judge sets no timeout of its own (the backend's attempt timeout decides)."""
    mixed = ScriptedChat(lambda i, conv: ConnectionError("down") if i % 2 == 0 else "garbage")
    mixed.max_retries = 3  # an attribute is not an instruction: nobody probes it any more
    [j] = asyncio.run(RubricJudge(mixed, max_retries=3, backoff_s=0.0).judge(judge_requests(1)))
    assert not j.ok and j.attempts == 4 and mixed.calls == 4
    final = ScriptedChat(lambda i, conv: ChatRequestError("HTTP 400", kind="http", status=400, retryable=False))
    judge = RubricJudge(final, max_retries=3, backoff_s=0.0)
    [k] = asyncio.run(judge.judge(judge_requests(1)))
    assert not k.ok and final.calls == 1 and "HTTP 400" in k.error and judge.stats.retries == 0
    slow = RubricJudge(ScriptedChat(delay=0.3), max_retries=0)
    [s] = asyncio.run(slow.judge(judge_requests(1)))
    assert s.ok and slow.stats.timeouts == 0


def test_group_wise_equals_per_candidate_with_fewer_calls():
    batch = judge_requests(4, "g1") + judge_requests(3, "g2")[1:] + [JudgeRequest("p", "s", (("user", "u"),), "lonely one", "")]
    single_chat, group_chat = ScriptedChat(), ScriptedChat()
    single = asyncio.run(RubricJudge(single_chat).judge(batch))
    grouped_judge = RubricJudge(group_chat, group_wise=True)
    grouped = asyncio.run(grouped_judge.judge(batch))
    assert [j.scores for j in grouped] == [j.scores for j in single] and all(j.ok for j in grouped)
    assert single_chat.calls == 7 and group_chat.calls == 3  # g1, g2, and the ungrouped one
    assert grouped_judge.stats.group_calls == 2
    assert "CANDIDATE_RESPONSE 4 id=" in group_chat.convs[0][1]["content"]


def test_group_wise_falls_back_to_single_calls_for_missing_candidates():
    def behave(i, conv):
        text = honest_json(conv)
        if '"candidates"' in text:  # drop candidate 2 from the group answer
            text = re.sub(r'\{"index": 2, "scores": \{[^}]*\}\}, ', "", text)
        return text

    chat = ScriptedChat(behave)
    judge = RubricJudge(chat, group_wise=True)
    out = asyncio.run(judge.judge(judge_requests(3)))
    expected = asyncio.run(RubricJudge(ScriptedChat()).judge(judge_requests(3)))
    assert [j.scores for j in out] == [j.scores for j in expected]
    assert judge.stats.group_fallbacks == 1 and chat.calls == 2
