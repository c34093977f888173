"""The format reward (rewards/format_reward.py): strict and graded modes, kardia and xml notations. Pure Python."""
import pytest
from conftest import ans

from kardia_rl.format.spans import render_spans
from kardia_rl.rewards import format_reward


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
