"""LLM-judge rewards are reproducible (RubricJudge, no Ray): the prompt's nonce and the backend's sampling seed
depend only on (judge seed, request, attempt); group judgments are cached per sibling set; single and group
judgments never share a cache entry. The Ray pool version is tests/test_judge_pool.py."""
from __future__ import annotations

import asyncio
import hashlib
import json

from conftest import quoted_candidates

from kardia_rl.rewards.judge.base import DIMENSIONS, ChatBackend, JudgeRequest
from kardia_rl.rewards.judge.rubric import RubricJudge

class PromptHashChat(ChatBackend):
    """A sampling-judge stand-in: every score is a hash of the whole prompt and the sampling seed (any change
    of nonce, sibling set or seed changes it). Records (prompt text, seed) per call. `garble` answers
    that many first calls with unparseable text (to exercise re-asks)."""

    def __init__(self, garble: int = 0):
        self.calls: list[tuple[str, object]] = []
        self.garble = garble

    async def complete(self, conversations, *, temperature, max_tokens, seed=None):
        (conv,) = conversations
        text = json.dumps(conv)
        self.calls.append((text, seed))
        if len(self.calls) <= self.garble:
            return ["no idea"]
        nonce, cands = quoted_candidates(conv[1]["content"])

        def dims(c):
            h = hashlib.sha256(f"{text}|{seed}|{c}".encode()).digest()
            return {d: 1 + h[k] % 5 for k, d in enumerate(DIMENSIONS)}

        if len(cands) == 1 and cands[0][0] is None:
            return [json.dumps({"id": nonce, "scores": dims(cands[0][1])})]
        return [json.dumps({"id": nonce, "candidates": [{"index": i, "scores": dims(c)} for i, c in cands]})]


def req(response: str, group: str = "p1", person: str = "MBTI: INFP\nAbout: nurse") -> JudgeRequest:
    return JudgeRequest(person, "a long shift", (("user", "I am exhausted."),), response, group)


def judge(j: RubricJudge, reqs):
    return asyncio.run(j.judge(reqs))


def scores(js):
    return [j.scores for j in js]


def test_nonce_and_sampling_seed_depend_only_on_seed_and_request():
    batch = [req("That sounds draining."), req("Rest if you can."), req("Go away.")]
    a_chat, b_chat = PromptHashChat(), PromptHashChat()
    a = judge(RubricJudge(a_chat, seed=5), batch)
    # another "actor": same judge seed, the requests arrive alone and in another order
    b_judge = RubricJudge(b_chat, seed=5)
    b = [judge(b_judge, [r])[0] for r in reversed(batch)][::-1]
    assert scores(a) == scores(b) and all(j.ok for j in a)
    assert sorted(a_chat.calls) == sorted(b_chat.calls)
    seeds = [s for _, s in a_chat.calls]
    assert len(set(seeds)) == 3, "each request gets its own sampling seed"
    # the judge seed matters: another seed gives other nonces and sampling seeds
    c_chat = PromptHashChat()
    judge(RubricJudge(c_chat, seed=6), batch)
    assert not set(c_chat.calls) & set(a_chat.calls)


def test_a_reask_uses_the_next_attempts_seed_and_reproduces():
    runs = []
    for _ in range(2):
        chat = PromptHashChat(garble=1)
        [j] = judge(RubricJudge(chat, seed=5, backoff_s=0.0), [req("That sounds draining.")])
        assert j.ok and j.attempts == 2
        runs.append((chat.calls, j.scores))
    (calls, _), (calls2, _) = runs
    assert calls == calls2 and runs[0][1] == runs[1][1]
    assert calls[0][1] != calls[1][1], "a retry samples with its own (deterministic) seed"


def test_group_judgment_is_cached_per_sibling_set():
    chat = PromptHashChat()
    j = RubricJudge(chat, seed=5, group_wise=True)
    first = judge(j, [req("A: that is hard."), req("B: sleep."), req("C: whatever.")])
    assert len(chat.calls) == 1 and not any(x.cached for x in first)
    # same set in another order: served from the cache, unchanged
    again = judge(j, [req("C: whatever."), req("A: that is hard."), req("B: sleep.")])
    assert len(chat.calls) == 1 and all(x.cached for x in again)
    assert scores(again) == [first[2].scores, first[0].scores, first[1].scores]
    # A and B next to other siblings: judged again, as one group of three, not reused from the first set
    other = judge(j, [req("A: that is hard."), req("B: sleep."), req("D: tell me more.")])
    assert len(chat.calls) == 2 and not any(x.cached for x in other)
    assert len(quoted_candidates(json.loads(chat.calls[1][0])[1]["content"])[1]) == 3
    fresh = judge(RubricJudge(PromptHashChat(), seed=5, group_wise=True),
                  [req("A: that is hard."), req("B: sleep."), req("D: tell me more.")])
    assert scores(other) == scores(fresh), "a group's scores depend on its set only, not on the cache's history"


def test_single_and_group_judgments_never_share_cache_entries():
    chat = PromptHashChat()
    j = RubricJudge(chat, seed=5, group_wise=True)
    [alone] = judge(j, [req("A: that is hard.")])  # the only candidate of its group: a single judgment
    grouped = judge(j, [req("A: that is hard."), req("B: sleep.")])
    assert len(chat.calls) == 2 and not grouped[0].cached
    [alone2] = judge(j, [req("A: that is hard.")])
    assert len(chat.calls) == 2 and alone2.cached and alone2.scores == alone.scores
    # the group order shown to the judge is fixed by (seed, set), whatever the arrival order
    c1, c2 = PromptHashChat(), PromptHashChat()
    judge(RubricJudge(c1, seed=5, group_wise=True), [req("A: that is hard."), req("B: sleep.")])
    judge(RubricJudge(c2, seed=5, group_wise=True), [req("B: sleep."), req("A: that is hard.")])
    assert c1.calls == c2.calls
