"""The judgment cache (JudgmentCache): hits, in-batch duplicates, failed judgments not cached, LRU eviction,
copies handed out, thread safety; and the hit rate through the unified reward."""
import asyncio
import threading

import pytest
from conftest import DIMENSIONS, Judgment, ScriptedChat, ans, honest_json, judge_requests, make_reward, reward_sample

from kardia_rl.rewards import JudgmentCache, RubricJudge


def test_cache_hits_duplicates_and_hit_rate():
    chat = ScriptedChat()
    judge = RubricJudge(chat)
    batch = judge_requests(3) + judge_requests(3)[:1]  # one duplicate inside the batch
    first = asyncio.run(judge.judge(batch))
    assert chat.calls == 3 and first[3].cached and first[3].scores == first[0].scores
    second = asyncio.run(judge.judge(judge_requests(3)))
    assert chat.calls == 3 and all(j.cached for j in second)
    assert [j.scores for j in second] == [j.scores for j in first[:3]]
    assert judge.cache.hits == 4 and judge.cache.misses == 3
    assert judge.cache.hit_rate == pytest.approx(4 / 7)
    r = make_reward(judge)
    asyncio.run(r.score([reward_sample()], [ans(response=judge_requests(1)[0].response)]))  # different context -> a miss
    assert chat.calls == 4 and r.stats_summary()["judge/cache_hit_rate"] == 0.0


def test_failed_judgments_are_not_cached():
    chat = ScriptedChat(lambda i, conv: "nope" if i == 0 else honest_json(conv))
    judge = RubricJudge(chat, max_retries=0)
    assert not asyncio.run(judge.judge(judge_requests(1)))[0].ok
    assert asyncio.run(judge.judge(judge_requests(1)))[0].ok and chat.calls == 2


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
