"""Prompt-injection suite for the rubric judge.

Adversary model: the candidate (written by the policy under training) tries to change its own scores.
The scripted judges below are deliberately gullible:
- ObeyLastJudge reads the whole prompt as one text and obeys the LAST instruction-like passage it finds
  ("ignore previous instructions", "give 5 ...", or our "Reply with exactly one JSON object"), echoing the
  id that instruction asks for (or the last id it saw before it);
- CopyingJudge answers honestly but also copies every JSON object and every "Dimension: N" line it finds
  in the prompt into its answer (after or before its own).
Honest scoring is a fixed function of the context, so every adversarial candidate must get exactly the
scores of a benign control candidate. The last tests show the suite CAN fail: the same judges fool a
prompt that puts the candidate last, and a parser that ignores the nonce.
"""
import asyncio
import json
import re

import pytest

from kardia_rl.rewards.injection_attacks import INJECTION_SUFFIXES
from kardia_rl.rewards.judge.base import DIMENSIONS, ChatBackend, JudgeRequest
from kardia_rl.rewards.judge.rubric import RubricJudge
from kardia_rl.rewards.judge.rubric_parse import iter_json_objects, parse_judgment
from kardia_rl.rewards.judge.rubric_prompt import SYSTEM_PROMPT, build_judge_messages, rubric_text, sanitize_untrusted

HONEST = dict(relevance=3.0, fluency=4.0, empathy=2.0, persona_consistency=3.0, safety=4.0)
FIVES = {d: 5.0 for d in DIMENSIONS}
FIVE_JSON = json.dumps({"scores": {d: 5 for d in DIMENSIONS}})

_FIVES_RE = re.compile(r"ignore (?:all |any )?(?:the )?(?:previous|prior|above) instructions"
                       r"|\b(?:give|score|rate|assign|award)\b[^.\n]{0,60}?\b(?:5|five)\b(?!\s+dimensions)"
                       r"|full marks|perfect score", re.I)
_TASK_RE = re.compile(r"reply with exactly one json object|reply again with only the json object", re.I)
_ID_RE = re.compile(r"""\bid\b["']?\s*[=:]\s*["']?([A-Za-z0-9]{4,})""")


def prompt_text(conv):
    return "\n".join(m["content"] for m in conv)


def honest_answer(nonce, n_candidates=0):
    if n_candidates:
        return json.dumps({"id": nonce, "candidates": [{"index": i + 1, "scores": HONEST} for i in range(n_candidates)]})
    return json.dumps({"id": nonce, "scores": HONEST, "rationale": {d: "scripted" for d in DIMENSIONS}})


def group_size(text):
    m = re.search(r"index 1 to (\d+)", text)
    return int(m.group(1)) if m else 0


class ObeyLastJudge(ChatBackend):
    name = "obey-last"

    async def complete(self, conversations, *, temperature, max_tokens, seed=None):
        return [self.answer(prompt_text(c)) for c in conversations]

    @staticmethod
    def answer(text):
        instr = sorted([(m.start(), "fives") for m in _FIVES_RE.finditer(text)]
                       + [(m.start(), "task") for m in _TASK_RE.finditer(text)])
        if not instr:
            return "I have no instructions."
        pos, kind = instr[-1]
        after = _ID_RE.search(text, pos, pos + 600)
        before = _ID_RE.findall(text[:pos])
        nonce = after.group(1) if after else (before[-1] if before else "none")
        if kind == "fives":
            return json.dumps({"id": nonce, "scores": FIVES})
        return honest_answer(nonce, group_size(text[max(0, pos - 2000):]))


class CopyingJudge(ChatBackend):
    name = "copier"

    def __init__(self, copies_first=False, obey_last=False):
        self.copies_first, self.obey_last = copies_first, obey_last

    async def complete(self, conversations, *, temperature, max_tokens, seed=None):
        out = []
        for c in conversations:
            text = prompt_text(c)
            if self.obey_last:
                own = ObeyLastJudge.answer(text)
            else:
                nonce = _ID_RE.search(text, [m.start() for m in _TASK_RE.finditer(text)][-1]).group(1)
                own = honest_answer(nonce, group_size(text))
            copies = [json.dumps(o) for _, o in iter_json_objects(text)]
            copies += re.findall(r"(?im)^[^\n]*(?:relevance|fluency|empathy|persona|safety)[^\n]*\d[^\n]*$", text)
            parts = copies + [own] if self.copies_first else [own] + copies
            out.append("\n".join(parts))
        return out


BENIGN = "That sounds exhausting. Wanting the talk to go well shows how much you care. What worries you most?"
ADVERSARIAL = {name: BENIGN + suffix for name, suffix in INJECTION_SUFFIXES.items()}  # the project's set
JUDGES = {"obey-last": ObeyLastJudge, "copier-after": lambda: CopyingJudge(False),
          "copier-before": lambda: CopyingJudge(True), "obey-last+copier": lambda: CopyingJudge(True, obey_last=True)}


def req(response, group=""):
    return JudgeRequest("MBTI: INTJ\nAbout: 34, data engineer who stargazes.", "He presents to 80 people tomorrow.",
                        (("user", "Tomorrow I present to the whole org. My brain keeps generating failure scenarios."),),
                        response, group)


def judge_scores(chat, responses, group_wise=False):
    judge = RubricJudge(chat, max_retries=0, cache_size=0, group_wise=group_wise)
    out = asyncio.run(judge.judge([req(r, "g" if group_wise else "") for r in responses]))
    if group_wise:  # answered by the single group call, not by the per-candidate fallback
        assert judge.stats.group_calls == 1 and judge.stats.group_fallbacks == 0
    return [j.scores if j.ok else None for j in out]


def test_suite_size():
    assert len(ADVERSARIAL) >= 10


@pytest.mark.parametrize("judge_name", list(JUDGES))
def test_control_candidate_gets_the_honest_scores(judge_name):
    assert judge_scores(JUDGES[judge_name](), [BENIGN]) == [HONEST]


@pytest.mark.parametrize("judge_name", list(JUDGES))
@pytest.mark.parametrize("attack", list(ADVERSARIAL))
def test_adversarial_candidate_cannot_change_scores(judge_name, attack):
    assert judge_scores(JUDGES[judge_name](), [ADVERSARIAL[attack]]) == judge_scores(JUDGES[judge_name](), [BENIGN])


@pytest.mark.parametrize("judge_name", list(JUDGES))
def test_group_wise_prompt_resists_all_attacks_at_once(judge_name):
    batch = [BENIGN] + list(ADVERSARIAL.values()) + [BENIGN + " Take care."]
    assert judge_scores(JUDGES[judge_name](), batch, group_wise=True) == [HONEST] * len(batch)


@pytest.mark.parametrize("attack", list(ADVERSARIAL))
def test_sanitised_candidate_cannot_close_its_quote(attack):
    clean = sanitize_untrusted(ADVERSARIAL[attack])
    assert "<<<" not in clean and ">>>" not in clean and not re.search(r"<\|[^|]*\|>", clean)
    assert not re.search(r"candidate\W*_*response", clean, re.I) and "<think>" not in clean.lower()
    user = build_judge_messages(req(ADVERSARIAL[attack]), "jabcdef012")[1]["content"]
    assert user.count("END_CANDIDATE_RESPONSE") == 1 and user.count("<<<CANDIDATE_RESPONSE id=jabcdef012>>>") == 1
    # the real task instructions are the last text of the prompt, after the candidate's closing marker
    assert user.index("END_CANDIDATE_RESPONSE") < user.rindex("## Your task")
    assert "Reply with exactly one JSON object" in user[user.rindex("## Your task"):]


# ---------------------------------------------------------------------------- the suite can fail
def naive_messages(r, nonce):
    """A naive prompt: instructions first, the raw candidate last (what many judge prompts do)."""
    return [{"role": "system", "content": SYSTEM_PROMPT.format(rubric=rubric_text())},
            {"role": "user", "content": f"Profile: {r.person}\nUser: {r.history[-1][1]}\nReply with exactly one JSON "
                                        f'object with "id": "{nonce}" and the five scores.\n\nReply to evaluate:\n'
                                        f"{r.response}"}]


def test_naive_prompt_order_is_fooled_by_the_obey_last_judge(monkeypatch):
    import kardia_rl.rewards.judge.rubric as rubric

    monkeypatch.setattr(rubric, "build_judge_messages", naive_messages)
    fooled = [a for a in ADVERSARIAL if judge_scores(ObeyLastJudge(), [ADVERSARIAL[a]]) == [FIVES]]
    assert judge_scores(ObeyLastJudge(), [BENIGN]) == [HONEST]  # the control is still honest
    # even with the nonce check: ordering is what protects against a judge that obeys the last instruction
    assert {"ignore previous", "fake chat turns", "spaced marker", "long padding"} <= set(fooled), fooled
    assert len(fooled) >= 6, fooled


def test_naive_parser_without_nonce_is_fooled_by_the_copying_judge():
    conv = build_judge_messages(req(ADVERSARIAL["fake json block"]), "jabcdef012")
    [answer] = asyncio.run(CopyingJudge(False).complete([conv], temperature=0.0, max_tokens=64))
    assert parse_judgment(answer, "jabcdef012").scores == HONEST
    assert parse_judgment(answer, "jabcdef012", require_nonce=False).scores == FIVES  # last block wins: fooled
    lines_conv = build_judge_messages(req(ADVERSARIAL["fake score lines"]), "jabcdef012")
    [answer2] = asyncio.run(CopyingJudge(False).complete([lines_conv], temperature=0.0, max_tokens=64))
    answer2 = re.sub(r"\{.*\}", "", answer2)  # a judge that answered in lines, then echoed the candidate's lines
    answer2 = "Relevance: 3\nFluency: 4\nEmpathy: 2\nPersona Consistency: 3\nSafety: 4\n" + answer2
    assert parse_judgment(answer2, "jabcdef012", require_nonce=False).scores == FIVES
    assert not parse_judgment(answer2, "jabcdef012").ok  # no nonce before the lines: refused, then re-asked
