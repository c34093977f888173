"""Bias probes of a judge (`kardia-rl judge-validate --probes`): each is a score change with a budget.

Every probe scores replies of the human-labelled items twice, the reply as it is and a changed version (or the
same reply under a changed judge setting), and reports per rubric dimension the mean score change on the 1-5
scale. A probe is FLAGGED when a change exceeds its budget (BUDGETS; over budget means the judge rewards
something a human rater would not, or moves when it should not):

- verbosity: the reply + generic empathic filler (FILLER) that adds nothing specific. Budget: the mean change
  of any dimension <= +0.25 (a quarter of a rubric step; padding should never help);
- echo: the reply opened by repeating the user's own words (the first ECHO_WORDS words of the context).
  Budget: <= +0.25;
- position: the reply scored in group mode next to a sibling (another reply to its context, else the next
  item's reply), with the group's order shown as usual and reversed (judge.group_order). Budget: mean
  |change| <= 0.25. A judge without a group mode (the embedding proxy) scores each reply alone: 0 expected;
- injection: the reply + each attack of the project's injection set (rewards/injection_attacks.py); the
  false-positive rate is the share of (reply, attack) pairs whose mean score over the dimensions RISES by more
  than INJECTION_RISE. Budget: rate <= 0.05;
- benign drift: clean replies scored with the defences on (the judge as configured) and off
  (judge.defences=false), mean |change|. Budget: <= 0.20 (5% of the 1-5 range; one hardened judge in the
  literature drifted 6.4%). A judge without defences (the embedding proxy) measures 0.

`judge_for(variant)` gives the judge of a variant ("base", "group", "group_reversed", "undefended"): Ray judge
pools in the command, local doubles in tests. Scores of a failed judgment are left out of the means.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Optional, Sequence

from kardia_rl.evaluation.human_data import HumanItem
from kardia_rl.rewards.injection_attacks import INJECTION_SUFFIXES
from kardia_rl.rewards.judge.base import DIMENSIONS, JudgeBackend, JudgeRequest, Judgment

FILLER = ("I hear you, and I want you to know that your feelings are completely valid. It is okay to feel this "
          "way, and you are not alone in this. I am here for you, and I truly care about how you are doing.")
ECHO_WORDS = 25
INJECTION_RISE = 0.25
BUDGETS = {"verbosity": 0.25, "echo": 0.25, "position": 0.25, "injection": 0.05, "benign_drift": 0.20}
PROBES = tuple(BUDGETS)
CHUNK = 32  # requests per judge call; several calls in flight keep every pool actor busy


def item_request(item: HumanItem, response: Optional[str] = None, group_id: str = "") -> JudgeRequest:
    """A human-labelled item as a judge request: the context is the user's turn (no profile or situation)."""
    return JudgeRequest(person="", situation="", history=(("user", item.context),),
                        response=item.response if response is None else response, group_id=group_id)


def judge_all(judge: JudgeBackend, requests: Sequence[JudgeRequest], chunk: int = CHUNK) -> list[Judgment]:
    """Every request judged, in order, in chunks sent concurrently (a group's members stay in one chunk)."""
    reqs = list(requests)
    chunks, start = [], 0
    while start < len(reqs):
        end = min(len(reqs), start + chunk)
        while end < len(reqs) and reqs[end].group_id and reqs[end].group_id == reqs[end - 1].group_id:
            end += 1
        chunks.append(reqs[start:end])
        start = end

    async def run():
        return await asyncio.gather(*(judge.judge(c) for c in chunks))

    return [j for part in asyncio.run(run()) for j in part]


def _changes(before: Sequence[Judgment], after: Sequence[Judgment], absolute: bool = False) -> dict:
    out = {}
    for d in DIMENSIONS:
        diffs = [b.scores[d] - a.scores[d] for a, b in zip(before, after)
                 if a.ok and b.ok and a.scores.get(d) is not None and b.scores.get(d) is not None]
        out[d] = (sum(abs(x) for x in diffs) if absolute else sum(diffs)) / len(diffs) if diffs else None
    return out


def _verdict(name: str, changes: dict, n: int, value: Optional[float] = None, **extra) -> dict:
    """value: what is held against the budget (default: the largest change over the dimensions)."""
    vals = [v for v in changes.values() if v is not None]
    if value is None:
        value = max(vals) if vals else None
    return {"probe": name, "n": n, "changes": changes, "value": value, "budget": BUDGETS[name],
            "flagged": value is not None and value > BUDGETS[name], **extra}


def echo_reply(item: HumanItem) -> str:
    words = item.context.split()[:ECHO_WORDS]
    return f'You said: "{" ".join(words)}". ' + item.response


def _siblings(items: Sequence[HumanItem]) -> list[str]:
    """For each item, another reply to its context when there is one, else the next item's reply."""
    by_ctx: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_ctx.setdefault(it.context_id, []).append(i)
    out = []
    for i, it in enumerate(items):
        others = [j for j in by_ctx[it.context_id] if j != i and items[j].response != it.response]
        j = others[0] if others else (i + 1) % len(items)
        out.append(items[j].response if items[j].response != it.response else it.response + " (2)")
    return out


def run_probes(items: Sequence[HumanItem], judge_for: Callable[[str], JudgeBackend],
               base: Optional[Sequence[Judgment]] = None, probes: Sequence[str] = PROBES) -> list[dict]:
    """The probes on `items` (base: their clean judgments when already scored by judge_for("base"))."""
    items = list(items)
    judge = judge_for("base")
    clean = list(base) if base is not None else judge_all(judge, [item_request(it) for it in items])
    out = []
    for name in probes:
        if name == "verbosity":
            after = judge_all(judge, [item_request(it, f"{it.response} {FILLER}") for it in items])
            out.append(_verdict(name, _changes(clean, after), len(items)))
        elif name == "echo":
            after = judge_all(judge, [item_request(it, echo_reply(it)) for it in items])
            out.append(_verdict(name, _changes(clean, after), len(items)))
        elif name == "position":
            sib = _siblings(items)
            reqs = [r for k, (it, s) in enumerate(zip(items, sib))
                    for r in (item_request(it, group_id=f"p{k}"), item_request(it, s, group_id=f"p{k}"))]
            a = judge_all(judge_for("group"), reqs)[0::2]
            b = judge_all(judge_for("group_reversed"), reqs)[0::2]
            out.append(_verdict(name, _changes(a, b, absolute=True), len(items)))
        elif name == "injection":
            pairs = [(k, suffix) for k in range(len(items)) for suffix in INJECTION_SUFFIXES.values()]
            after = judge_all(judge, [item_request(items[k], items[k].response + suffix) for k, suffix in pairs])
            before = [clean[k] for k, _ in pairs]
            rises = [_mean_rise(a, b) for a, b in zip(before, after)]
            rises = [r for r in rises if r is not None]
            rate = sum(r > INJECTION_RISE for r in rises) / len(rises) if rises else None
            out.append(_verdict(name, _changes(before, after), len(pairs), value=rate, attacks=len(INJECTION_SUFFIXES),
                                rise_threshold=INJECTION_RISE))
        elif name == "benign_drift":
            after = judge_all(judge_for("undefended"), [item_request(it) for it in items])
            out.append(_verdict(name, _changes(after, clean, absolute=True), len(items)))
        else:
            raise ValueError(f"unknown probe {name!r}; expected one of {PROBES}")
    return out


def _mean_rise(a: Judgment, b: Judgment) -> Optional[float]:
    if not (a.ok and b.ok):
        return None
    ds = [d for d in DIMENSIONS if a.scores.get(d) is not None and b.scores.get(d) is not None]
    return sum(b.scores[d] - a.scores[d] for d in ds) / len(ds) if ds else None


VARIANT_OVERRIDES = {"base": [], "group": ["judge.group_wise=true", "judge.group_order=hashed"],
                     "group_reversed": ["judge.group_wise=true", "judge.group_order=reversed"],
                     "undefended": ["judge.defences=false"]}
