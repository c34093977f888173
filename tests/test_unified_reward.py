"""The unified reward (rewards/unified.py): weights, what the judge sees, malformed answers, emotion credit by
format mode, the judge fallbacks (neutral, zero, midpoint) and the logged summary. Scripted judges, no model."""
import asyncio

import pytest
from conftest import DIMENSIONS, ans, length_judge, make_reward, reward_sample

from kardia_rl.rewards import JudgeBackend, summary


def test_unified_weights_and_judge_sees_only_the_response_span():
    judge = length_judge()
    r = make_reward(judge, format_weight=0.5, emotion_weight=0.2, rubric_weight=0.3)
    comp = ans("nervous", "abcd")  # len 4 -> score 5 on every dim -> rubric 1.0
    [b] = asyncio.run(r.score([reward_sample()], [comp]))
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
    r = make_reward(length_judge())
    [b] = asyncio.run(r.score([reward_sample()], [ans("sad", "abc")]))  # rubric (1+3-1)/4 = 0.75 (len 3 -> score 4)
    assert b.total == pytest.approx((1.0 + 0.0 + 0.75) / 3)


def test_malformed_answer_gets_no_judge_call_unless_configured():
    judge = length_judge()
    r = make_reward(judge)
    bad = ans("anxious", "abcd").replace("<|understanding_begin|>", "")
    [b] = asyncio.run(r.score([reward_sample()], [bad]))
    assert judge.requests == [] and b.rubric == 0.0 and not b.judged and b.parse_error
    # its closed emotion span matches the gold label, but a malformed answer earns no emotion credit
    assert r.stats["malformed_skipped"] == 1 and b.format == 0.0 and b.emotion == 0.0 and b.total == 0.0
    judge2 = length_judge()
    r2 = make_reward(judge2, judge_malformed=True)
    [b2] = asyncio.run(r2.score([reward_sample()], [bad]))
    assert [q.response for q in judge2.requests] == ["abcd"] and b2.judged and b2.rubric == 1.0
    [b3] = asyncio.run(r2.score([reward_sample()], ["no spans at all"]))  # no response span: the whole text
    assert judge2.requests[-1].response == "no spans at all" and b3.judged


def test_unified_emotion_credit_follows_the_format_mode():
    """The unified reward reads the same rule: strict credits only well-formed answers, graded a well-formed span."""
    texts = ["sad", "<|emotion_begin|>sad<|emotion_end|> blah", ans("sad", "abc").replace("<|response_end|>", ""),
             ans("sad", "abc")]
    samples = [reward_sample(i, "sad") for i in range(len(texts))]
    strict = asyncio.run(make_reward(length_judge()).score(samples, texts))
    assert [b.emotion for b in strict] == [0.0, 0.0, 0.0, 1.0]
    assert [b.predicted_emotion for b in strict] == [None, None, None, "sad"]
    graded = asyncio.run(make_reward(length_judge(), format_mode="graded").score(samples, texts))
    assert [b.emotion for b in graded] == [0.0, 1.0, 1.0, 1.0]
    assert summary(strict)["reward/emotion_mean"] == 0.25


def test_rubric_weight_zero_skips_the_judge():
    judge = length_judge()
    r = make_reward(judge, rubric_weight=0.0)
    [b] = asyncio.run(r.score([reward_sample()], [ans()]))
    assert judge.requests == [] and not b.judged and b.rubric == 0.0


def group_scores(fallback, completions):
    r = make_reward(length_judge(), fallback=fallback)
    out = asyncio.run(r.score([reward_sample()] * len(completions), completions, ["g"] * len(completions)))
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
    r = make_reward(length_judge())
    comps = [ans(response="abcd"), ans(response="FAIL"), ans(response="a"), ans(response="FAILx")]
    out = asyncio.run(r.score([reward_sample()] * 4, comps, ["g1", "g1", "g2", "g2"]))
    assert out[1].rubric == 1.0 and out[3].rubric == pytest.approx(0.25)


def test_a_judge_that_raises_never_raises_into_training():
    class Raising(JudgeBackend):
        async def judge(self, requests):
            raise RuntimeError("boom")

    r = make_reward(Raising())
    out = asyncio.run(r.score([reward_sample(), reward_sample()], [ans(), ans()], ["g", "g"]))
    assert all(b.fallback and b.rubric == 0.5 and "boom" in b.judge_error for b in out)
    assert r.stats["judge_failures"] == 2


def test_summary_names():
    r = make_reward(length_judge())
    s = summary(asyncio.run(r.score([reward_sample()], [ans()])))
    for k in ("reward/total_mean", "reward/format_mean", "reward/emotion_mean", "reward/rubric_mean",
              "judge/relevance_mean", "judge/persona_consistency_mean", "judge/safety_mean"):
        assert k in s
    assert "judge/latency_p95" in r.stats_summary()


def test_summary_omits_dimension_means_when_nothing_was_judged():
    r = make_reward(length_judge())
    s = summary(asyncio.run(r.score([reward_sample()], ["malformed"])))
    assert s["reward/malformed_rate"] == 1.0 and s["judge/judged_rate"] == 0.0
    assert not any(k.endswith("empathy_mean") for k in s) and summary([]) == {}
