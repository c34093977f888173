"""Format and unified rewards (the emotion reward itself: test_emotion_reward.py); RubricJudge retries/timeouts/
fallbacks/concurrency; cache; group-wise.

Everything here is pure Python with scripted judges (no model), so the file runs in about a second.
"""
import asyncio
import re
import threading

import pytest

from kardia_rl.config.schema import JudgeConfig, RewardConfig
from kardia_rl.format.spans import render_spans
from kardia_rl.rewards import (
    DIMENSIONS, JudgeBackend, Judgment, JudgeRequest, JudgmentCache, RubricJudge, UnifiedReward, aggregate_scores,
    format_reward, summary,
)
from kardia_rl.rewards.judge.base import ChatBackend


def ans(emotion="anxious", response="That sounds stressful. What worries you most?"):
    return render_spans("They feel uneasy.", "The talk is tomorrow.", emotion, response)


# ------------------------------------------------------------------------------------------ format reward
def test_format_strict_and_notations():
    assert format_reward(ans()) == 1.0
    assert format_reward(ans().replace("<|response_end|>", "")) == 0.0
    xml = "<understanding>u</understanding><reasoning>r</reasoning><emotion>sad</emotion><response>hi</response>"
    assert format_reward(xml) == 0.0  # kardia notation does not accept xml tags
    assert format_reward(xml, notation="xml") == 1.0
    assert format_reward(xml, notation="auto") == 1.0
    with pytest.raises(ValueError):
        format_reward(ans(), mode="lenient")


@pytest.mark.parametrize("text, expected", [
    (ans(), 1.0),
    # response span missing: 3 spans credited
    (render_spans("u", "r", "sad", "x").split("<|response_begin|>")[0], 0.75),
    # all four spans but text outside: 1.0 - 0.125, capped at 0.75 for any malformed answer
    ("Sure! " + ans(), 0.75),
    # two structural errors (outside text twice) -> 1 - 0.25
    ("Sure! " + ans() + " Bye", 0.75),
    # out of order (emotion before reasoning) and outside text: 1 - 0.25 - 0.125
    ("hi <|understanding_begin|>u<|understanding_end|><|emotion_begin|>sad<|emotion_end|>"
     "<|reasoning_begin|>r<|reasoning_end|><|response_begin|>x<|response_end|>", 0.625),
    # empty emotion span: 3 spans credited
    (render_spans("u", "r", " ", "x"), 0.75),
    # duplicated response: 3 credited
    (ans() + "<|response_begin|>again<|response_end|>", 0.75),
    # only one span, text around it: 0.25 - 2 * 0.125
    ("a <|emotion_begin|>sad<|emotion_end|> b", 0.0),
    ("just prose, no spans", 0.0),
    ("", 0.0),
])
def test_format_graded_hand_cases(text, expected):
    assert format_reward(text, mode="graded") == pytest.approx(expected)


def test_format_graded_is_one_iff_strict_is_one():
    base = ans()
    corruptions = [base, base[5:], base[:-3], base.replace("<|emotion_begin|>", ""), "x" + base, base + base,
                   base.replace("anxious", ""), base.replace("<|reasoning_end|>", "<|emotion_end|>")]
    for t in corruptions:
        g, s = format_reward(t, "graded"), format_reward(t, "strict")
        assert 0.0 <= g <= 1.0
        assert (g == 1.0) == (s == 1.0), t


# ------------------------------------------------------------------------------------------ aggregation
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


# ------------------------------------------------------------------------------------------ scripted judges
class RecordingJudge(JudgeBackend):
    """Direct JudgeBackend: scores = f(response); fails for responses containing 'FAIL'."""

    def __init__(self):
        self.requests = []

    async def judge(self, requests):
        self.requests.extend(requests)
        out = []
        for r in requests:
            if "FAIL" in r.response:
                out.append(Judgment(scores={d: None for d in DIMENSIONS}, ok=False, error="scripted", fallback=True))
            else:
                s = float(1 + len(r.response) % 5)
                out.append(Judgment(scores={d: s for d in DIMENSIONS}, rationale={d: "len" for d in DIMENSIONS}))
        return out


def sample(i=0, emotion="anxious"):
    return {"id": f"s{i}", "person": "MBTI: INTJ\nAbout: engineer", "situation": "talk tomorrow", "emotion": emotion,
            "history": [{"role": "user", "content": "I present tomorrow."},
                        {"role": "assistant", "content": ans("anxious", "PAST REPLY")},
                        {"role": "user", "content": "I can't sleep."}]}


def make_reward(judge, fallback="neutral", judge_malformed=False, **rw):
    return UnifiedReward(RewardConfig(**rw), JudgeConfig(fallback=fallback, judge_malformed=judge_malformed), judge)


def test_unified_weights_and_judge_sees_only_the_response_span():
    judge = RecordingJudge()
    r = make_reward(judge, format_weight=0.5, emotion_weight=0.2, rubric_weight=0.3)
    comp = ans("nervous", "abcd")  # len 4 -> score 5 on every dim -> rubric 1.0
    [b] = asyncio.run(r.score([sample()], [comp]))
    assert (b.format, b.emotion, b.rubric) == (1.0, 1.0, 1.0)
    assert b.total == pytest.approx(0.5 + 0.2 + 0.3)
    assert b.dims == {d: 5.0 for d in DIMENSIONS} and b.judged and not b.fallback
    [req] = judge.requests
    assert req.response == "abcd"  # not the understanding/reasoning/emotion spans
    assert "They feel uneasy" not in repr(req)
    # past assistant turns reduced to what the user saw; history ends with the user turn being answered
    assert req.history == (("user", "I present tomorrow."), ("assistant", "PAST REPLY"), ("user", "I can't sleep."))
    assert req.group_id == "s0"


def test_default_lambdas_are_one_third():
    r = make_reward(RecordingJudge())
    [b] = asyncio.run(r.score([sample()], [ans("sad", "abc")]))  # rubric (1+3-1)/4 = 0.75 (len 3 -> score 4)
    assert b.total == pytest.approx((1.0 + 0.0 + 0.75) / 3)


def test_malformed_answer_gets_no_judge_call_unless_configured():
    judge = RecordingJudge()
    r = make_reward(judge)
    bad = ans("anxious", "abcd").replace("<|understanding_begin|>", "")
    [b] = asyncio.run(r.score([sample()], [bad]))
    assert judge.requests == [] and b.rubric == 0.0 and not b.judged and b.parse_error
    # its closed emotion span matches the gold label, but a malformed answer earns no emotion credit
    assert r.stats["malformed_skipped"] == 1 and b.format == 0.0 and b.emotion == 0.0 and b.total == 0.0
    judge2 = RecordingJudge()
    r2 = make_reward(judge2, judge_malformed=True)
    [b2] = asyncio.run(r2.score([sample()], [bad]))
    assert [q.response for q in judge2.requests] == ["abcd"] and b2.judged and b2.rubric == 1.0
    [b3] = asyncio.run(r2.score([sample()], ["no spans at all"]))  # no response span: the whole text
    assert judge2.requests[-1].response == "no spans at all" and b3.judged


def test_unified_emotion_credit_follows_the_format_mode():
    """The unified reward reads the same rule: strict credits only well-formed answers, graded a well-formed span."""
    texts = ["sad", "<|emotion_begin|>sad<|emotion_end|> blah", ans("sad", "abc").replace("<|response_end|>", ""),
             ans("sad", "abc")]
    samples = [sample(i, "sad") for i in range(len(texts))]
    strict = asyncio.run(make_reward(RecordingJudge()).score(samples, texts))
    assert [b.emotion for b in strict] == [0.0, 0.0, 0.0, 1.0]
    assert [b.predicted_emotion for b in strict] == [None, None, None, "sad"]
    graded = asyncio.run(make_reward(RecordingJudge(), format_mode="graded").score(samples, texts))
    assert [b.emotion for b in graded] == [0.0, 1.0, 1.0, 1.0]
    assert summary(strict)["reward/emotion_mean"] == 0.25


def test_rubric_weight_zero_skips_the_judge():
    judge = RecordingJudge()
    r = make_reward(judge, rubric_weight=0.0)
    [b] = asyncio.run(r.score([sample()], [ans()]))
    assert judge.requests == [] and not b.judged and b.rubric == 0.0


def group_scores(fallback, completions):
    r = make_reward(RecordingJudge(), fallback=fallback)
    out = asyncio.run(r.score([sample()] * len(completions), completions, ["g"] * len(completions)))
    return r, out


def test_neutral_fallback_is_the_group_mean_and_counted():
    comps = [ans(response="a"), ans(response="abcd"), ans(response="abFAIL"), ans(response="abc")]
    r, out = group_scores("neutral", comps)
    ok = [b.rubric for b in out if not b.fallback]
    assert ok == [pytest.approx(0.25), 1.0, 0.75]
    failed = out[2]
    assert failed.fallback and failed.judge_failed and failed.judge_error == "scripted"
    assert failed.rubric == pytest.approx(sum(ok) / 3)  # no advantage signal, never a silent 0
    assert failed.dims == {d: None for d in DIMENSIONS}
    assert r.stats["fallbacks"] == 1 and r.stats["judge_failures"] == 1 and r.stats["judge_calls"] == 4
    s = summary(out)
    assert s["judge/fallback_rate"] == 0.25 and s["judge/failure_rate"] == 0.25
    assert s["judge/empathy_mean"] == pytest.approx((2 + 5 + 4) / 3)  # over successful judgments only


def test_neutral_fallback_when_the_whole_group_fails_gives_equal_values():
    r, out = group_scores("neutral", [ans(response="FAIL1"), ans(response="FAIL22")])
    assert [b.rubric for b in out] == [0.5, 0.5] and r.stats["fallbacks"] == 2


def test_zero_and_midpoint_fallbacks():
    comps = [ans(response="abcd"), ans(response="FAIL")]
    assert group_scores("zero", comps)[1][1].rubric == 0.0
    assert group_scores("midpoint", comps)[1][1].rubric == 0.5


def test_groups_are_separate_for_the_neutral_fallback():
    r = make_reward(RecordingJudge())
    comps = [ans(response="abcd"), ans(response="FAIL"), ans(response="a"), ans(response="FAILx")]
    out = asyncio.run(r.score([sample()] * 4, comps, ["g1", "g1", "g2", "g2"]))
    assert out[1].rubric == 1.0 and out[3].rubric == pytest.approx(0.25)


def test_a_judge_that_raises_never_raises_into_training():
    class Raising(JudgeBackend):
        async def judge(self, requests):
            raise RuntimeError("boom")

    r = make_reward(Raising())
    out = asyncio.run(r.score([sample(), sample()], [ans(), ans()], ["g", "g"]))
    assert all(b.fallback and b.rubric == 0.5 and "boom" in b.judge_error for b in out)
    assert r.stats["judge_failures"] == 2


def test_summary_names():
    r = make_reward(RecordingJudge())
    s = summary(asyncio.run(r.score([sample()], [ans()])))
    for k in ("reward/total_mean", "reward/format_mean", "reward/emotion_mean", "reward/rubric_mean",
              "judge/relevance_mean", "judge/persona_consistency_mean", "judge/safety_mean"):
        assert k in s
    assert "judge/latency_p95" in r.stats_summary()


# ------------------------------------------------------------------------------------------ RubricJudge
def honest_json(messages, base=None):
    """A well-behaved judge answer: echoes the nonce of the last instruction; scores from the candidate."""
    text = messages[-1]["content"] if base is None else base
    nonce = re.findall(r'"id": "(j[0-9a-f]{9})"', text)[-1]
    cands = re.findall(r"<<<CANDIDATE_RESPONSE(?: (\d+))? id=j[0-9a-f]{9}>>>\n(.*?)\n<<<END_", text, re.S)
    def dims(c):
        return {d: 1 + (len(c) + k) % 5 for k, d in enumerate(DIMENSIONS)}
    if len(cands) == 1 and not cands[0][0]:
        return '{"id": "%s", "scores": %s}' % (nonce, str(dims(cands[0][1])).replace("'", '"'))
    entries = ", ".join('{"index": %s, "scores": %s}' % (i, str(dims(c)).replace("'", '"')) for i, c in cands)
    return '{"id": "%s", "candidates": [%s]}' % (nonce, entries)


class ScriptedChat(ChatBackend):
    """Per-call behaviour from a function of (call index, conversation); tracks concurrency."""

    def __init__(self, behave=None, delay=0.0):
        self.behave = behave or (lambda i, conv: honest_json(conv))
        self.delay, self.calls, self.convs = delay, 0, []
        self.in_flight = self.peak = 0

    async def complete(self, conversations, *, temperature, max_tokens, seed=None):
        assert len(conversations) == 1
        i = self.calls
        self.calls += 1
        self.convs.append(conversations[0])
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            out = self.behave(i, conversations[0])
            if isinstance(out, BaseException) and not isinstance(out, ValueError):
                raise out
            return [out]
        finally:
            self.in_flight -= 1


def reqs(n, group="g"):
    return [JudgeRequest(f"profile {group}", "situation", (("user", "hello"),), f"reply number {i}" + "!" * i, group)
            for i in range(n)]


def test_rubric_judge_scores_and_bounds_concurrency():
    chat = ScriptedChat(delay=0.01)
    judge = RubricJudge(chat, max_in_flight=3, backoff_s=0.0)
    out = asyncio.run(judge.judge(reqs(10)))
    assert all(j.ok and not j.fallback and j.attempts == 1 for j in out)
    for r, j in zip(reqs(10), out):
        assert j.scores == {d: float(1 + (len(r.response) + k) % 5) for k, d in enumerate(DIMENSIONS)}
    assert chat.calls == 10 and chat.peak == 3
    assert judge.stats.as_dict()["judge/requests"] == 10


def test_reask_after_parse_failure_then_success():
    chat = ScriptedChat(lambda i, conv: "I think it is fine." if i == 0 else honest_json(conv, conv[1]["content"]))
    judge = RubricJudge(chat, backoff_s=0.0)
    [j] = asyncio.run(judge.judge(reqs(1)))
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
                await real_sleep(10)  # the per-request timeout cancels this
            return await super().complete(conversations, **kw)

    chat = SlowForZero(behave)
    judge = RubricJudge(chat, timeout_s=0.05, max_retries=2, backoff_s=0.1)
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    out = asyncio.run(judge.judge(reqs(5)))
    monkeypatch.setattr(asyncio, "sleep", real_sleep)
    assert [j.ok for j in out] == [False, False, False, False, True]
    assert all(j.fallback and all(v is None for v in j.scores.values()) for j in out[:4])
    assert "timeout" in out[0].error and "ConnectionError" in out[1].error and "ValueError" in out[2].error
    assert "parse error" in out[3].error and out[3].raw == "garbage without scores"
    assert all(j.attempts == 3 for j in out[:4])
    st = judge.stats
    assert (st.failures, st.timeouts, st.parse_failures, st.retries) == (4, 3, 3, 8)
    assert st.backend_errors == 6
    assert sorted(s for s in sleeps if s > 0) == sorted([0.1, 0.2] * 4)  # exponential backoff per request
    # through the unified reward: counted neutral fallbacks, no exception
    r = make_reward(RubricJudge(SlowForZero(behave), timeout_s=0.05, max_retries=0))
    comps = [ans(response=q.response) for q in reqs(5)]
    res = asyncio.run(r.score([sample()] * 5, comps, ["g"] * 5))
    assert r.stats["fallbacks"] == 4 and r.stats["judge_failures"] == 4
    assert all(b.rubric == pytest.approx(res[4].rubric) for b in res)


def test_backend_that_retries_itself_is_not_retried_again():
    chat = ScriptedChat(lambda i, conv: ConnectionError("down"))
    chat.max_retries = 3  # like OpenAIChatBackend: it owns transport retries
    judge = RubricJudge(chat, max_retries=3, backoff_s=0.0, timeout_s=1.0)
    [j] = asyncio.run(judge.judge(reqs(1)))
    assert not j.ok and chat.calls == 1 and judge.call_timeout_s is None


def test_backend_that_owns_timeouts_is_not_cut_off_while_queued():
    # A backend with its own retries/timeouts may legitimately wait (rate limiter, Retry-After) longer than
    # timeout_s before answering; that wait must not be cancelled and miscounted as a judge timeout.
    chat = ScriptedChat(delay=0.3)
    chat.max_retries = 2
    judge = RubricJudge(chat, max_retries=1, backoff_s=0.0, timeout_s=0.05)
    [j] = asyncio.run(judge.judge(reqs(1)))
    assert j.ok and judge.stats.timeouts == 0 and chat.calls == 1
    plain = RubricJudge(ScriptedChat(delay=0.3), max_retries=0, backoff_s=0.0, timeout_s=0.05)
    [k] = asyncio.run(plain.judge(reqs(1)))
    assert not k.ok and plain.stats.timeouts == 1  # without own retries, our timeout applies


def test_cache_hits_duplicates_and_hit_rate():
    chat = ScriptedChat()
    judge = RubricJudge(chat)
    batch = reqs(3) + reqs(3)[:1]  # one duplicate inside the batch
    first = asyncio.run(judge.judge(batch))
    assert chat.calls == 3 and first[3].cached and first[3].scores == first[0].scores
    second = asyncio.run(judge.judge(reqs(3)))
    assert chat.calls == 3 and all(j.cached for j in second)
    assert [j.scores for j in second] == [j.scores for j in first[:3]]
    assert judge.cache.hits == 4 and judge.cache.misses == 3
    assert judge.cache.hit_rate == pytest.approx(4 / 7)
    r = make_reward(judge)
    asyncio.run(r.score([sample()], [ans(response=reqs(1)[0].response)]))  # different context -> a miss
    assert chat.calls == 4 and r.stats_summary()["judge/cache_hit_rate"] == 0.0


def test_failed_judgments_are_not_cached():
    chat = ScriptedChat(lambda i, conv: "nope" if i == 0 else honest_json(conv))
    judge = RubricJudge(chat, max_retries=0)
    assert not asyncio.run(judge.judge(reqs(1)))[0].ok
    assert asyncio.run(judge.judge(reqs(1)))[0].ok and chat.calls == 2


def test_judgment_cache_lru_and_threads():
    c = JudgmentCache(2)
    j = Judgment(scores={d: 3.0 for d in DIMENSIONS})
    c.put(("a",), j)
    c.put(("b",), j)
    assert c.get(("a",)).cached  # refreshes a
    c.put(("c",), j)  # evicts b
    assert c.get(("b",)) is None and c.get(("a",)) is not None and len(c) == 2
    c.put(("f",), Judgment(scores={}, ok=False))
    assert c.get(("f",)) is None
    got = c.get(("a",))
    got.scores["empathy"] = 1.0  # callers get copies
    assert c.get(("a",)).scores["empathy"] == 3.0
    big = JudgmentCache(64)

    def work(t):
        for i in range(300):
            big.put((t, i % 80), j)
            big.get((t, (i * 7) % 80))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(big) == 64 and big.hits + big.misses == 1200


def test_group_wise_equals_per_candidate_with_fewer_calls():
    batch = reqs(4, "g1") + reqs(3, "g2")[1:] + [JudgeRequest("p", "s", (("user", "u"),), "lonely one", "")]
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
    out = asyncio.run(judge.judge(reqs(3)))
    expected = asyncio.run(RubricJudge(ScriptedChat()).judge(reqs(3)))
    assert [j.scores for j in out] == [j.scores for j in expected]
    assert judge.stats.group_fallbacks == 1 and chat.calls == 2


def test_summary_omits_dimension_means_when_nothing_was_judged():
    r = make_reward(RecordingJudge())
    s = summary(asyncio.run(r.score([sample()], ["malformed"])))
    assert s["reward/malformed_rate"] == 1.0 and s["judge/judged_rate"] == 0.0
    assert not any(k.endswith("empathy_mean") for k in s) and summary([]) == {}
