"""The refinement loop: dialogues advance together in rounds, each round one batched call per role.

A dialogue is a small state machine:

    user ──U──> answer ──A──> evaluate ──R──> FAIL and revisions left ──> answer (revise with R's critique)
                                          └─> otherwise: the turn is committed; SOLVED or max_exchanges -> done,
                                              else back to user

Up to synth.max_concurrent_dialogues dialogues are in flight; each round collects every in-flight dialogue's
pending call, sends one batch per role (U, A and R batches run at the same time when they use different
backends, so the engines and the judge stay busy), and advances every dialogue by one step. A finished
dialogue frees its slot for the next one at the next round.

Determinism: every request carries a seed derived from (synth seed, dialogue id, turn, attempt, role), and
the rounds are a function of the inputs only (admission in input order, no timing), so a run repeats
exactly on CPU engines (with a deterministic evaluator). An answer that is not a well-formed four-span
answer (or names an unknown emotion) is failed locally without asking R (R can only judge a reply it can
see), with the format problem as its critique; a turn still failing after synth.max_revisions revisions is
kept with its FAIL history (a hard sample), unless its format is broken, which ends the dialogue (the
structural-degradation filter drops it).
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from kardia_rl.format.prompt import build_system_prompt, DEFAULT_SYSTEM_TEMPLATE
from kardia_rl.synth import roles
from kardia_rl.synth.inputs import Profile, Seed, dialogue_id

USER_RETRIES = 2  # fresh samples after an empty or failed user turn before the dialogue is dropped


@dataclass
class Roles:
    """The three clients (two may be the same object: one engine pool serves U and A) and what R needs."""
    user: Any
    responder: Any
    evaluator: Any
    labels: Sequence[str]
    secret: str  # R's nonce secret (unknown to A)


@dataclass
class _Turn:
    user: str
    attempts: list = field(default_factory=list)  # A's texts, in order
    verdicts: list = field(default_factory=list)
    critiques: list = field(default_factory=list)
    format_errors: list = field(default_factory=list)


@dataclass
class _Dialogue:
    rec_id: str
    profile: Profile
    seed: Seed
    system: str
    history: list = field(default_factory=list)  # committed user/assistant messages
    turns: list = field(default_factory=list)  # committed _Turn objects
    cur: Optional[_Turn] = None
    phase: str = "user"  # user | answer | evaluate | done
    retries: int = 0  # of the current U or R call
    r_chat: Optional[list] = None  # R's conversation while re-asking
    end: str = ""
    drop: str = ""  # non-empty: the dialogue is dropped for this reason


def _seed(base: int, *parts) -> int:
    return int.from_bytes(hashlib.sha256(repr((base, *parts)).encode()).digest()[:7], "big")


class RefinementLoop:
    def __init__(self, cfg, clients: Roles):
        self.cfg, self.sy, self.r = cfg, cfg.synth, clients
        self.template = cfg.data.system_template or DEFAULT_SYSTEM_TEMPLATE
        self.responder_tokens = self.sy.responder_max_tokens or cfg.model.max_new_tokens
        self.calls = {"user": 0, "responder": 0, "evaluator": 0}
        self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="synth-role")

    # ------------------------------------------------------------------ driving
    def run(self, todo: Sequence[tuple[Profile, Seed]], on_done: Callable[[str, Optional[dict], str], None]) -> None:
        """Synthesise every (profile, seed) pair; `on_done(rec_id, record or None, drop reason)` per dialogue,
        in the order they finish."""
        queue = list(todo)
        active: list[_Dialogue] = []
        while queue or active:
            while queue and len(active) < self.sy.max_concurrent_dialogues:
                p, s = queue.pop(0)
                active.append(_Dialogue(dialogue_id(p, s), p, s, build_system_prompt(p.person, s.situation, self.template)))
            self._round(active)
            for d in [d for d in active if d.phase == "done"]:
                active.remove(d)
                on_done(d.rec_id, None if d.drop else self.record(d), d.drop)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _round(self, active: list[_Dialogue]) -> None:
        batches = {ph: [d for d in active if d.phase == ph] for ph in ("user", "answer", "evaluate")}
        local = [d for d in batches["evaluate"] if self._format_error(d) is not None]
        for d in local:  # a malformed answer fails without an R call
            self._verdict(d, "FAIL", {"format": self._format_error(d)})
        batches["evaluate"] = [d for d in batches["evaluate"] if d not in local]
        work = {"user": (self.r.user, self._user_reqs, self._user_done),
                "answer": (self.r.responder, self._answer_reqs, self._answer_done),
                "evaluate": (self.r.evaluator, self._eval_reqs, self._eval_done)}
        # Batches that share a client run one after the other (an engine serves one generate call at a time);
        # different clients run at the same time.
        by_client: dict[int, list[str]] = {}
        for ph, (client, _, _) in work.items():
            if batches[ph]:
                by_client.setdefault(id(client), []).append(ph)

        def run_phases(phases):
            for ph in phases:
                client, make, done = work[ph]
                reqs, temp, max_tokens = make(batches[ph])
                self.calls[{"user": "user", "answer": "responder", "evaluate": "evaluator"}[ph]] += len(reqs)
                outs = client.complete(reqs, temperature=temp, max_tokens=max_tokens)
                for d, out in zip(batches[ph], outs):
                    done(d, out)

        for f in [self._pool.submit(run_phases, phases) for phases in by_client.values()]:
            f.result()

    # ------------------------------------------------------------------ U
    def _user_reqs(self, ds):
        reqs = [roles.Request(roles.user_messages(d.profile.person, d.seed.situation, d.seed.emotion, d.history),
                              _seed(self.cfg.seed, d.rec_id, len(d.turns), d.retries, "user")) for d in ds]
        return reqs, self.sy.user_temperature, self.sy.user_max_tokens

    def _user_done(self, d: _Dialogue, out) -> None:
        text = "" if isinstance(out, Exception) else roles.clean_user_turn(out)
        if not text:
            d.retries += 1
            if d.retries > USER_RETRIES:
                self._finish(d, drop="user_failed" if not d.turns else "", end="user_failed")
            return
        d.retries, d.cur, d.phase = 0, _Turn(user=text), "answer"

    # ------------------------------------------------------------------ A
    def _answer_reqs(self, ds):
        reqs = []
        for d in ds:
            c = d.cur
            revision = (c.attempts[-1], c.critiques[-1]) if c.attempts else None
            sample = roles.responder_sample(d.rec_id, len(d.turns), d.profile.person, d.profile.mbti, d.seed.emotion,
                                            d.seed.situation, d.profile.anon_username, d.system,
                                            d.history + [{"role": "user", "content": c.user}], revision)
            cfg = roles.responder_cfg(self.cfg, revision is not None)
            reqs.append(roles.Request(roles.responder_messages(sample, cfg),
                                      _seed(self.cfg.seed, d.rec_id, len(d.turns), len(c.attempts), "responder"),
                                      sample, cfg))
        return reqs, self.sy.responder_temperature, self.responder_tokens

    def _answer_done(self, d: _Dialogue, out) -> None:
        d.cur.attempts.append("" if isinstance(out, Exception) else str(out).strip())
        d.phase, d.retries, d.r_chat = "evaluate", 0, None

    def _format_error(self, d: _Dialogue) -> Optional[str]:
        text = d.cur.attempts[-1]
        if not text:
            return "the answer is empty (or its request failed)"
        return roles.answer_format(text, self.r.labels, self.cfg.data.span_notation)

    # ------------------------------------------------------------------ R
    def _nonce(self, d: _Dialogue) -> str:
        return roles.evaluator_nonce(self.r.secret, d.rec_id, len(d.turns), len(d.cur.attempts))

    def _eval_reqs(self, ds):
        reqs = []
        for d in ds:
            if d.r_chat is None:
                d.r_chat = roles.evaluator_messages(d.profile.person, d.seed.situation, d.seed.emotion,
                                                    d.history + [{"role": "user", "content": d.cur.user}],
                                                    d.cur.attempts[-1], self._nonce(d))
            reqs.append(roles.Request(list(d.r_chat), _seed(self.cfg.seed, d.rec_id, len(d.turns),
                                                            len(d.cur.attempts), d.retries, "evaluator")))
        return reqs, self.sy.evaluator_temperature, self.sy.evaluator_max_tokens

    def _eval_done(self, d: _Dialogue, out) -> None:
        nonce = self._nonce(d)
        pv = roles.parse_verdict(out, nonce)
        if pv.verdict is None:
            d.retries += 1
            if d.retries > self.sy.evaluator_retries:
                self._finish(d, drop="evaluator_unreadable", end="evaluator_unreadable")
                return
            if isinstance(out, str):  # show R its own unusable answer, then ask again (same nonce)
                d.r_chat = d.r_chat + [{"role": "assistant", "content": out}, roles.verdict_reask(pv.error, nonce)]
            return
        self._verdict(d, pv.verdict, pv.critiques)

    # ------------------------------------------------------------------ bookkeeping
    def _verdict(self, d: _Dialogue, verdict: str, critiques: dict) -> None:
        c = d.cur
        c.verdicts.append(verdict)
        c.critiques.append(critiques)
        c.format_errors.append(critiques.get("format"))
        if verdict == "FAIL" and len(c.attempts) <= self.sy.max_revisions:
            d.phase = "answer"  # revise with this critique
            return
        d.history += [{"role": "user", "content": c.user}, {"role": "assistant", "content": c.attempts[-1]}]
        d.turns.append(c)
        d.cur = None
        if c.format_errors[-1] is not None:
            self._finish(d, end="format_broken")
        elif verdict == "SOLVED":
            self._finish(d, end="solved")
        elif len(d.turns) >= self.sy.max_exchanges:
            self._finish(d, end="max_exchanges")
        else:
            d.phase = "user"

    def _finish(self, d: _Dialogue, end: str, drop: str = "") -> None:
        if not drop and not d.turns:
            drop = end  # nothing was committed: no record to write
        d.phase, d.end, d.drop = "done", end, drop

    def record(self, d: _Dialogue) -> dict:
        """The KardiaBench record with the synthesis fields (contract in kardia_rl/synth/__init__.py)."""
        turns = [{"verdicts": list(t.verdicts), "revisions": len(t.attempts) - 1, "critiques": list(t.critiques),
                  "format_ok": t.format_errors[-1] is None, "user": t.user} for t in d.turns]
        return {"id": d.rec_id, "person": d.profile.person, "mbti": d.profile.mbti, "emotion": d.seed.emotion,
                "situation": d.seed.situation, "anon_username": d.profile.anon_username,
                "messages": [{"role": "system", "content": d.system}] + [dict(m) for m in d.history],
                "verdicts": [list(t.verdicts) for t in d.turns],
                "synth": {"profile": d.profile.source, "seed": d.seed.source, "seed_index": d.seed.index,
                          "end": d.end, "turns": turns}}
