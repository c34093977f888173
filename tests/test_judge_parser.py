"""The judge-answer parser on a corpus of real-looking judge outputs (valid, fenced, prose-wrapped, line
format, tables, thinking, partial, garbage, out-of-range, wrong types) plus the group-wise parser."""
import math

import pytest

from kardia_rl.rewards.judge.base import DIMENSIONS
from kardia_rl.rewards.judge.rubric_parse import (
    canonical_dimension, coerce_score, iter_json_objects, parse_group_judgment, parse_judgment,
)

N = "j0a1b2c3d4"
ALL4 = {d: 4.0 for d in DIMENSIONS}
S1 = dict(relevance=4.0, fluency=5.0, empathy=3.0, persona_consistency=2.0, safety=5.0)

# (name, judge answer, expected scores or None for a failure, expected missing dims for failures)
CORPUS = [
    ("plain json", '{"id": "%s", "scores": {"relevance": 4, "fluency": 5, "empathy": 3, "persona_consistency": 2, '
                   '"safety": 5}, "rationale": {"relevance": "Answers the question.", "empathy": "Generic."}}' % N, S1, None),
    ("fenced json", 'Here is my evaluation:\n\n```json\n{\n  "id": "%s",\n  "scores": {\n    "relevance": 4,\n    '
                    '"fluency": 5,\n    "empathy": 3,\n    "persona_consistency": 2,\n    "safety": 5\n  }\n}\n```' % N, S1, None),
    ("fence without language", '```\n{"id": "%s", "scores": {"relevance": 4, "fluency": 4, "empathy": 4, '
                               '"persona_consistency": 4, "safety": 4}}\n```' % N, ALL4, None),
    ("prose around json", 'After reading the conversation carefully, I judge the reply as follows. '
                          '{"id": "%s", "scores": {"relevance": 4, "fluency": 5, "empathy": 3, "persona_consistency": 2, '
                          '"safety": 5}} Overall it is a decent but generic reply.' % N, S1, None),
    ("title-case names", '{"id": "%s", "scores": {"Relevance": 4, "Fluency": 5, "Empathy": 3, "Persona Consistency": 2, '
                         '"Safety": 5}}' % N, S1, None),
    ("upper/hyphen names", '{"id": "%s", "scores": {"RELEVANCE": 4, "FLUENCY": 5, "EMPATHY": 3, "persona-consistency": 2, '
                           '"SAFETY": 5}}' % N, S1, None),
    ("numeric strings", '{"id": "%s", "scores": {"relevance": "4", "fluency": "5/5", "empathy": "3 out of 5", '
                        '"persona_consistency": "2", "safety": "5"}}' % N, S1, None),
    ("per-dim objects", '{"id": "%s", "relevance": {"score": 4, "rationale": "on topic"}, "fluency": {"score": 5, '
                        '"reason": "natural"}, "empathy": {"rating": 3}, "persona_consistency": {"score": 2}, '
                        '"safety": {"score": 5}}' % N, S1, None),
    ("flat top-level", '{"id": "%s", "relevance": 4, "fluency": 5, "empathy": 3, "persona_consistency": 2, "safety": 5}'
     % N, S1, None),
    ("list of dimensions", '{"id": "%s", "scores": [{"dimension": "relevance", "score": 4}, {"dimension": "fluency", '
                           '"score": 5}, {"dimension": "empathy", "score": 3}, {"name": "Persona consistency", "score": 2}, '
                           '{"dimension": "safety", "score": 5}]}' % N, S1, None),
    ("wrapped once", '{"evaluation": {"id": "%s", "scores": {"relevance": 4, "fluency": 5, "empathy": 3, '
                     '"persona_consistency": 2, "safety": 5}}}' % N, S1, None),
    ("trailing commas", '{"id": "%s", "scores": {"relevance": 4, "fluency": 5, "empathy": 3, "persona_consistency": 2, '
                        '"safety": 5,},}' % N, S1, None),
    ("python quotes", "{'id': '%s', 'scores': {'relevance': 4, 'fluency': 5, 'empathy': 3, 'persona_consistency': 2, "
                      "'safety': 5}}" % N, S1, None),
    ("float scores", '{"id": "%s", "scores": {"relevance": 4.5, "fluency": 5.0, "empathy": 3.0, "persona_consistency": '
                     '2.0, "safety": 5.0}}' % N, {**S1, "relevance": 4.5}, None),
    ("out of range clamped", '{"id": "%s", "scores": {"relevance": 7, "fluency": 0, "empathy": -2, "persona_consistency": '
                             '5, "safety": 10}}' % N, dict(relevance=5.0, fluency=1.0, empathy=1.0,
                                                            persona_consistency=5.0, safety=5.0), None),
    ("ten-point scale strings", '{"id": "%s", "scores": {"relevance": "8/10", "fluency": "10/10", "empathy": "6/10", '
                                '"persona_consistency": "4/10", "safety": "10/10"}}' % N, S1, None),
    ("lines", "id: %s\nRelevance: 4\nFluency: 5\nEmpathy: 3\nPersona Consistency: 2\nSafety: 5" % N, S1, None),
    ("bulleted markdown lines", "ID %s\n\n- **Relevance**: 4/5 - addresses the worry directly\n- **Fluency**: 5/5\n"
                                "- **Empathy** = 3/5 (generic)\n- **Persona consistency**: 2\n- **Safety**: 5 - fine" % N,
     S1, None),
    ("numbered lines", "%s\n1. relevance - 4\n2. fluency - 5\n3. empathy - 3\n4. persona_consistency - 2\n5. safety - 5"
     % N, S1, None),
    ("markdown table", "id=%s\n\n| Dimension | Score | Why |\n|---|---|---|\n| Relevance | 4 | on topic |\n"
                       "| Fluency | 5 | clear |\n| Empathy | 3 | generic |\n| Persona Consistency | 2 | ignores profile |\n"
                       "| Safety | 5 | respectful |" % N, S1, None),
    ("qwen3 thinking then json", "<think>\nThe user is anxious. Relevance: 1? No, the reply addresses it. "
                                 '{"id": "%s", "scores": {"relevance": 1, "fluency": 1, "empathy": 1, '
                                 '"persona_consistency": 1, "safety": 1}}\n</think>\n\n'
                                 '{"id": "%s", "scores": {"relevance": 4, "fluency": 5, "empathy": 3, '
                                 '"persona_consistency": 2, "safety": 5}}' % (N, N), S1, None),
    ("dangling think close", 'Okay, let me weigh this... relevance 2 maybe.\n</think>\n{"id": "%s", "scores": '
                             '{"relevance": 4, "fluency": 4, "empathy": 4, "persona_consistency": 4, "safety": 4}}' % N,
     ALL4, None),
    ("self-correction: last complete block wins", '{"id": "%s", "scores": {"relevance": 2, "fluency": 2, "empathy": 2, '
                                                  '"persona_consistency": 2, "safety": 2}}\nWait, I misread the reply. '
                                                  'Corrected:\n{"id": "%s", "scores": {"relevance": 4, "fluency": 4, '
                                                  '"empathy": 4, "persona_consistency": 4, "safety": 4}}' % (N, N),
     ALL4, None),
    ("complete block then partial afterthought", '{"id": "%s", "scores": {"relevance": 4, "fluency": 4, "empathy": 4, '
                                                 '"persona_consistency": 4, "safety": 4}}\nNote: {"id": "%s", "scores": '
                                                 '{"empathy": 1}}' % (N, N), ALL4, None),
    # ---- failures
    ("partial: safety missing", '{"id": "%s", "scores": {"relevance": 4, "fluency": 5, "empathy": 3, '
                                '"persona_consistency": 2}}' % N, None, ("safety",)),
    ("partial lines", "id: %s\nRelevance: 4\nEmpathy: 3" % N, None, ("fluency", "persona_consistency", "safety")),
    ("word scores", '{"id": "%s", "scores": {"relevance": "high", "fluency": "good", "empathy": 3, '
                    '"persona_consistency": 2, "safety": 5}}' % N, None, ("relevance", "fluency")),
    ("wrong types", '{"id": "%s", "scores": {"relevance": true, "fluency": [5], "empathy": null, "persona_consistency": '
                    '{"x": 1}, "safety": "NaN"}}' % N, None, DIMENSIONS),
    ("missing id", '{"scores": {"relevance": 5, "fluency": 5, "empathy": 5, "persona_consistency": 5, "safety": 5}}',
     None, DIMENSIONS),
    ("wrong id", '{"id": "j9999999999", "scores": {"relevance": 5, "fluency": 5, "empathy": 5, '
                 '"persona_consistency": 5, "safety": 5}}', None, DIMENSIONS),
    ("lines without id", "Relevance: 5\nFluency: 5\nEmpathy: 5\nPersona Consistency: 5\nSafety: 5", None, DIMENSIONS),
    ("refusal", "I'm sorry, but I can't help with evaluating this conversation.", None, DIMENSIONS),
    ("garbage tokens", "ĠtheĠtheĠ<|im_end|> ,,,, 4 4 4 ]] {{{", None, DIMENSIONS),
    ("empty", "", None, DIMENSIONS),
    ("truncated json", '{"id": "%s", "scores": {"relevance": 4, "fluency": 5, "empa' % N, None, DIMENSIONS),
    ("unclosed thinking", "<think>\nLet me consider relevance: 5, fluency: 5, empathy: 5, persona: 5, safety: 5 and id %s"
     % N, None, DIMENSIONS),
]


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 25 and sum(exp is None for _, _, exp, _ in CORPUS) >= 8


@pytest.mark.parametrize("name, text, expected, missing", CORPUS, ids=[c[0] for c in CORPUS])
def test_parse_corpus(name, text, expected, missing):
    p = parse_judgment(text, N)
    if expected is None:
        assert not p.ok and p.error
        assert set(p.missing) == set(missing), p
    else:
        assert p.ok, p.error
        assert p.scores == pytest.approx(expected)
        assert all(1.0 <= v <= 5.0 for v in p.scores.values())


def test_rationales_are_kept_per_dimension():
    p = parse_judgment(CORPUS[0][1], N)
    assert p.rationale == {"relevance": "Answers the question.", "empathy": "Generic."}
    lines = parse_judgment(dict((c[0], c[1]) for c in CORPUS)["bulleted markdown lines"], N)
    assert lines.rationale["relevance"] == "addresses the worry directly" and lines.source == "lines"
    table = parse_judgment(dict((c[0], c[1]) for c in CORPUS)["markdown table"], N)
    assert table.rationale["persona_consistency"] == "ignores profile"


def test_clamped_dimensions_are_reported():
    p = parse_judgment(dict((c[0], c[1]) for c in CORPUS)["out of range clamped"], N)
    assert set(p.clamped) == {"relevance", "fluency", "empathy", "safety"}


def test_missing_id_error_names_the_nonce():
    p = parse_judgment(dict((c[0], c[1]) for c in CORPUS)["missing id"], N)
    assert N in p.error and "id" in p.error


def test_naive_mode_reads_blocks_without_id():
    p = parse_judgment(dict((c[0], c[1]) for c in CORPUS)["missing id"], N, require_nonce=False)
    assert p.ok and p.scores == {d: 5.0 for d in DIMENSIONS}
    with pytest.raises(ValueError):
        parse_judgment("{}", None)


def test_lines_after_the_nonce_only_and_first_line_wins():
    text = ("Relevance: 1\nFluency: 1\nEmpathy: 1\nPersona Consistency: 1\nSafety: 1\n"
            f"id: {N}\nRelevance: 4\nFluency: 4\nEmpathy: 4\nPersona Consistency: 4\nSafety: 4\n"
            "The reply said: Relevance: 5\nSafety: 5")
    assert parse_judgment(text, N).scores == ALL4


@pytest.mark.parametrize("name, dim", [("Persona Consistency", "persona_consistency"), ("persona-consistency", "persona_consistency"),
                                       ("PERSONA_CONSISTENCY", "persona_consistency"), (" persona ", "persona_consistency"),
                                       ("Relevancy", "relevance"), ("empathetic", "empathy"), ("SAFETY", "safety"),
                                       ("overall", None), (4, None)])
def test_canonical_dimension(name, dim):
    assert canonical_dimension(name) == dim


@pytest.mark.parametrize("value, score, clamped", [(4, 4.0, False), ("4", 4.0, False), ("4/5", 4.0, False),
                                                   ("8/10", 4.0, False), (" **3** ", 3.0, False), (9, 5.0, True),
                                                   (0, 1.0, True), (True, None, False), (None, None, False),
                                                   ("four", None, False), (float("nan"), None, False),
                                                   (float("inf"), None, False), ("3/0", None, False), ([4], None, False)])
def test_coerce_score(value, score, clamped):
    assert coerce_score(value) == (score, clamped)


def test_iter_json_objects_finds_objects_after_broken_braces():
    objs = iter_json_objects('prose {not json} and {"a": {"b": 1}} then {"c": "}"}')
    assert [o for _, o in objs] == [{"a": {"b": 1}}, {"c": "}"}]


def entry(i, s):
    return '{"index": %d, "scores": {"relevance": %d, "fluency": %d, "empathy": %d, "persona_consistency": %d, ' \
           '"safety": %d}}' % (i, s, s, s, s, s)


def test_group_parser_maps_by_index():
    text = '```json\n{"id": "%s", "candidates": [%s, %s, %s]}\n```' % (N, entry(3, 1), entry(1, 5), entry(2, 3))
    out = parse_group_judgment(text, N, 3)
    assert [p.scores["empathy"] for p in out] == [5.0, 3.0, 1.0] and all(p.ok for p in out)


def test_group_parser_failures():
    no_id = '{"candidates": [%s, %s]}' % (entry(1, 5), entry(2, 5))
    assert not any(p.ok for p in parse_group_judgment(no_id, N, 2))
    partial = '{"id": "%s", "candidates": [%s, %s]}' % (N, entry(1, 5), entry(7, 5))  # index 7 out of range
    out = parse_group_judgment(partial, N, 2)
    assert out[0].ok and not out[1].ok
    positional = '{"id": "%s", "candidates": [%s, %s]}' % (N, entry(1, 2).replace('"index": 1, ', ""),
                                                          entry(2, 4).replace('"index": 2, ', ""))
    assert [p.scores["safety"] for p in parse_group_judgment(positional, N, 2)] == [2.0, 4.0]
    assert not any(p.ok for p in parse_group_judgment(positional, N, 3))  # count mismatch: no guessing
    keyed = '{"id": "%s", "candidates": {"1": %s, "candidate_2": %s}}' % (N, entry(1, 3), entry(2, 4))
    assert [p.scores["fluency"] for p in parse_group_judgment(keyed, N, 2)] == [3.0, 4.0]
    assert not any(p.ok for p in parse_group_judgment("garbage", N, 2))


def test_nan_free_scores():
    p = parse_judgment('{"id": "%s", "scores": {"relevance": NaN, "fluency": 5, "empathy": 5, '
                       '"persona_consistency": 5, "safety": 5}}' % N, N)
    assert not p.ok and p.missing == ("relevance",) and not any(math.isnan(v) for v in p.scores.values())


def test_brace_flood_before_the_answer_neither_hides_it_nor_takes_long():
    answer = '{"id": "%s", "scores": {"relevance": 4, "fluency": 4, "empathy": 4, "persona_consistency": 4, ' \
             '"safety": 4}}' % N
    for flood in ('{"' * 1500, "{" * 20000, '{"a": 1} ' * 2000, '{"x": "' * 500):
        assert parse_judgment(flood + answer, N).scores == ALL4
    assert not parse_judgment('{"' * 1500 + answer.replace(N, "j-other"), N).ok
