"""RubricJudge: an LLM judge (any ChatBackend) scoring the five rubric dimensions in one call.

`judge()` runs in named phases: plan (which calls, which cache keys) -> serve from the cache -> per call:
prompt (with a nonce, rubric_prompt.py) -> call with retries (under a semaphore, `max_in_flight`) -> parse
(tolerant, rubric_parse.py) -> collect (cache the judgments, copy duplicates). A parse failure is re-asked
(the judge is shown its answer and the reason), a retryable backend failure (a timeout, an HTTP 5xx/429, a
connection error, any exception of a backend without a richer error) is re-sent, both out of ONE budget of
`max_retries` retries per request with jittered exponential backoff (`backoff_s * 2**k`, at least a 429's
Retry-After); after that, or at once for a failure the backend marks as final (a 4xx), a failed Judgment
(ok=False, fallback=True, error set, scores None). The backend makes one attempt per call and bounds it by
its own timeout (the factory gives it judge.timeout_s; see judge/base.py for who applies which setting). The
fallback VALUE is chosen by the caller that knows the group (UnifiedReward: neutral/zero/midpoint); this
class never raises for a per-request failure and never invents a score.

Group-wise mode (`group_wise=True`): the unique candidates of one call sharing a non-empty group_id and
context are scored in one call (numbered, each in its own nonce-marked quote, so the judge sees the
contrast and the backend sees one long prompt instead of N), in an order fixed by the judge seed and the
set (a keyed hash of each response), never by arrival order; candidates the group answer does not cover
are re-judged one by one. The output has the same shape as per-candidate mode. A group judgment is cached
under a key that holds the whole sibling set and is served whole or re-judged whole (judge/cache.py).

Measurement knobs (judge-validate --probes, never for training): `group_order="reversed"` shows a group in the
reverse of that order (the position probe), `defences=False` asks with build_undefended_messages and parses
without the nonce (the benign-drift probe; group calls keep the defended prompt).

Reproducibility: the judge seed (the run's `seed`, the same in every judge actor) and the request alone
decide the prompt's nonce and the backend's sampling seed (`request_seed`: a hash of the seed, the cache
key and the attempt number), so a request gives the same prompt and the same sampling whichever actor
serves it, in whichever batch, and also when it is re-sent after an actor died.

Duplicate requests in one batch are judged once (the copies count as cache hits), which matters for GRPO
groups where a policy repeats itself.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from kardia_rl.monitoring.stats import percentile
from kardia_rl.rewards.judge.base import (
    MAX_RAW_CHARS, ChatBackend, ChatRequestError, JudgeBackend, Judgment, JudgeRequest, RetryPolicy, failed_judgment,
    retry_delay,
)
from kardia_rl.rewards.judge.cache import JudgmentCache
from kardia_rl.rewards.judge.rubric_parse import parse_group_judgment, parse_judgment
from kardia_rl.rewards.judge.rubric_prompt import (
    build_group_messages, build_judge_messages, build_undefended_messages, make_nonce, reask_message,
    rubric_version_hash,
)

log = logging.getLogger(__name__)
Unit = tuple[list[int], list[tuple]]  # ([request index per unique candidate], [their cache keys]): one call


def _backend_model_name(chat: ChatBackend) -> str:
    """The judge model's name or path (part of the cache key: another judge model must not reuse scores)."""
    for attr in ("model_name", "model_path", "model"):
        v = getattr(chat, attr, None)
        if isinstance(v, str):
            return v
    return ""


@dataclass
class JudgeStats:
    requests: int = 0  # requests received by judge()
    calls: int = 0  # backend calls, retries and group calls included
    group_calls: int = 0
    group_fallbacks: int = 0  # candidates re-judged one by one after a group answer missed them
    retries: int = 0
    timeouts: int = 0
    parse_failures: int = 0
    backend_errors: int = 0
    failures: int = 0  # requests that ended without a judgment (after all retries)
    latencies: deque = field(default_factory=lambda: deque(maxlen=10000))

    def as_dict(self) -> dict:
        lat = list(self.latencies)
        return {"judge/requests": self.requests, "judge/calls": self.calls, "judge/group_calls": self.group_calls,
                "judge/group_fallbacks": self.group_fallbacks, "judge/retries": self.retries,
                "judge/timeouts": self.timeouts, "judge/parse_failures": self.parse_failures,
                "judge/backend_errors": self.backend_errors, "judge/failures": self.failures,
                "judge/latency_p50": percentile(lat, 50) if lat else 0.0,
                "judge/latency_p95": percentile(lat, 95) if lat else 0.0}


class RubricJudge(JudgeBackend):
    name = "rubric"

    def __init__(self, chat: ChatBackend, *, max_in_flight: int = 16, max_retries: int = 3, backoff_s: float = 0.5,
                 temperature: float = 0.0, max_tokens: int = 512, cache_size: int = 4096, group_wise: bool = False,
                 seed: Optional[int] = 0, group_order: str = "hashed", defences: bool = True):
        if max_in_flight < 1 or max_retries < 0 or backoff_s < 0:
            raise ValueError(f"RubricJudge: need max_in_flight >= 1, max_retries >= 0, backoff_s >= 0; "
                             f"got {max_in_flight}, {max_retries}, {backoff_s}")
        self.chat = chat
        self.max_in_flight, self.max_retries, self.backoff_s = max_in_flight, max_retries, backoff_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self.group_wise, self.seed = group_wise, seed
        if group_order not in ("hashed", "reversed"):
            raise ValueError(f"RubricJudge: group_order {group_order!r} is not hashed or reversed")
        # reversed and undefended exist to MEASURE position bias and the defences' drift (judge-validate --probes)
        self.reverse_groups, self.defences = group_order == "reversed", defences
        self.cache = JudgmentCache(cache_size) if cache_size > 0 else None
        # The nonce secret: deterministic for a seed (reproducible prompts); the candidate never sees it.
        self._secret = f"seed={seed}" if seed is not None else secrets.token_hex(16)
        # single vs group is part of every cache key (JudgeRequest.cache_key), not of the version
        self.version = rubric_version_hash(f"{chat.name}|{_backend_model_name(chat)}"
                                           + ("" if defences else "|undefended"))
        self._jitter = random.Random()  # spreads retries in time only; never touches prompts or scores
        self.stats = JudgeStats()
        self._sem: Optional[asyncio.Semaphore] = None
        self._sem_loop = None

    @classmethod
    def from_config(cls, chat: ChatBackend, cfg_judge, policy: RetryPolicy, seed: Optional[int] = 0) -> "RubricJudge":
        """The factory's constructor: the retry part of `policy` (its timeout went to `chat`)."""
        return cls(chat, max_in_flight=cfg_judge.max_in_flight, max_retries=policy.max_retries,
                   backoff_s=policy.backoff_s, temperature=cfg_judge.temperature, max_tokens=cfg_judge.max_tokens,
                   cache_size=cfg_judge.cache_size, group_wise=cfg_judge.group_wise, seed=seed,
                   group_order=cfg_judge.group_order, defences=cfg_judge.defences)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:  # a semaphore is bound to one event loop
            self._sem, self._sem_loop = asyncio.Semaphore(self.max_in_flight), loop
        return self._sem

    async def close(self) -> None:
        await self.chat.close()

    # ------------------------------------------------------------------------------------------ public
    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgment]:
        reqs = list(requests)
        self.stats.requests += len(reqs)
        out: list[Optional[Judgment]] = [None] * len(reqs)
        try:
            units, keys = self._plan(reqs)
            todo = self._serve_from_cache(units, out)
            results = await asyncio.gather(*(self._judge_unit(reqs, unit) for unit in todo))
            self._collect(todo, results, units, keys, out)
        except Exception as e:  # noqa: BLE001 - a bug here must not crash training: fail the rest, loudly
            log.exception("RubricJudge.judge failed")
            for i, j in enumerate(out):
                if j is None:
                    self.stats.failures += 1
                    out[i] = failed_judgment(f"internal judge error: {type(e).__name__}: {e}")
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ phases
    def _plan(self, reqs: list[JudgeRequest]) -> tuple[list[Unit], list[tuple]]:
        """(units, the cache key of every request). A unit is one call: several candidates are one group call
        (in canonical order), one candidate a single call. Duplicates (same key) are in no unit: they get a
        copy of their first occurrence's judgment."""
        keys: list[Optional[tuple]] = [None] * len(reqs)
        groups: dict = {}
        for i, r in enumerate(reqs):
            if self.group_wise and r.group_id:
                groups.setdefault((r.group_id, r.context()), {}).setdefault(r.response, []).append(i)
        units = []
        for by_response in groups.values():
            if len(by_response) < 2:
                continue  # a group of one is judged alone, under a single key
            first = [idx[0] for idx in by_response.values()]
            first = [first[k] for k in self._canonical_order([reqs[i].response for i in first])]
            siblings = tuple(sorted(by_response))
            for idx in by_response.values():
                for i in idx:
                    keys[i] = reqs[i].cache_key(self.version, siblings)
            units.append((first, [keys[i] for i in first]))
        seen: set = set()
        for i, r in enumerate(reqs):
            if keys[i] is None:
                keys[i] = r.cache_key(self.version)
                if keys[i] not in seen:
                    seen.add(keys[i])
                    units.append(([i], [keys[i]]))
        return units, keys  # type: ignore[return-value]

    def _serve_from_cache(self, units: list[Unit], out: list) -> list[Unit]:
        """Fill `out` for the units the cache holds (a group only whole); returns the units left to judge."""
        todo = []
        for idx, ukeys in units:
            hit = None
            if self.cache is not None:
                hit = [self.cache.get(ukeys[0])] if len(ukeys) == 1 else self.cache.get_all(ukeys)
            if hit is None or hit[0] is None:
                todo.append((idx, ukeys))
                continue
            for i, j in zip(idx, hit):
                out[i] = j
        return todo

    async def _judge_unit(self, reqs: list[JudgeRequest], unit: Unit) -> list[Judgment]:
        idx, ukeys = unit
        if len(idx) == 1:
            return [await self._judge_one(reqs[idx[0]], ukeys[0])]
        return await self._judge_group([reqs[i] for i in idx], ukeys)

    def _collect(self, todo: list[Unit], results: list[list[Judgment]], units: list[Unit], keys: list[tuple],
                 out: list) -> None:
        """Place the new judgments, cache them, and give each duplicate a copy of its first occurrence's
        (counted as a cache hit when that one succeeded)."""
        for (idx, ukeys), res in zip(todo, results):
            for i, k, j in zip(idx, ukeys, res):
                out[i] = j
                if self.cache is not None:
                    self.cache.put(k, j)
        first = {ukeys[n]: i for idx, ukeys in units for n, i in enumerate(idx)}
        for i in range(len(out)):
            if out[i] is None:
                src = out[first[keys[i]]]
                dup = copy.deepcopy(src)
                if src.ok:
                    dup.cached, dup.latency_s = True, 0.0
                    if self.cache is not None:
                        self.cache.record_hit()
                out[i] = dup

    # ------------------------------------------------------------------------------------------ calls
    def request_seed(self, key: tuple, attempt: int = 0) -> Optional[int]:
        """The backend's sampling seed for attempt `attempt` of the request with cache key `key`: a function of
        (judge seed, request, attempt) only, never of the actor or batch (None when the judge is unseeded)."""
        if self.seed is None:
            return None
        h = hashlib.sha256(repr((self._secret, "sampling", key, attempt)).encode("utf-8")).digest()
        return int.from_bytes(h[:4], "big") >> 1  # 31 bits: a valid seed for every backend (OpenAI, vLLM, torch)

    def _canonical_order(self, responses: Sequence[str]) -> list[int]:
        """Positions of a group's responses in the order they are shown to the judge: by a keyed hash, so the
        order depends on (seed, set) only and carries no systematic position bias (unlike sorting by text)."""
        order = sorted(range(len(responses)), key=lambda i: (
            hashlib.sha256(f"{self._secret}|{responses[i]}".encode("utf-8")).digest(), responses[i]))
        return order[::-1] if self.reverse_groups else order

    async def _judge_one(self, req: JudgeRequest, key: tuple) -> Judgment:
        """One candidate: prompt, then call with retries (parse inside: a parse failure is re-asked)."""
        nonce = make_nonce(self._secret, key)
        build = build_judge_messages if self.defences else build_undefended_messages
        return await self._call_with_retries(build(req, nonce), key, nonce)

    async def _call_with_retries(self, prompt: list[dict], key: tuple, nonce: str) -> Judgment:
        """Up to max_retries + 1 attempts in all, whatever fails (transport or parse): one budget per request."""
        conv, err, raw, retry_after = prompt, "no attempt", "", 0.0
        t0 = time.perf_counter()
        attempt = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(retry_delay(self.backoff_s, attempt, self._jitter, retry_after))
            reply = await self._call(conv, self.request_seed(key, attempt))
            if isinstance(reply, ChatRequestError):
                err, retry_after = str(reply), reply.retry_after_s
                if not reply.retryable:
                    break
                continue
            raw = reply
            parsed = parse_judgment(reply, nonce, require_nonce=self.defences)
            if parsed.ok:
                lat = time.perf_counter() - t0
                self.stats.latencies.append(lat)
                return Judgment(scores=dict(parsed.scores), rationale=dict(parsed.rationale),
                                raw=reply[:MAX_RAW_CHARS], latency_s=lat, attempts=attempt + 1)
            self.stats.parse_failures += 1
            err, retry_after = f"parse error: {parsed.error}", 0.0
            conv = prompt + [{"role": "assistant", "content": reply[:MAX_RAW_CHARS]},
                             reask_message(parsed.error, nonce)]
        self.stats.failures += 1
        return failed_judgment(err, raw, time.perf_counter() - t0, attempt + 1)

    async def _call(self, conv: list[dict], seed: Optional[int]) -> Union[str, ChatRequestError]:
        """One backend attempt under the semaphore: the text, or the failure as a counted ChatRequestError
        (whatever the backend raised or returned instead of one string)."""
        async with self._semaphore():
            self.stats.calls += 1
            try:
                res = await self.chat.complete([conv], temperature=self.temperature, max_tokens=self.max_tokens,
                                               seed=seed)
            except Exception as e:  # noqa: BLE001 - any backend failure is a failed attempt, never a crash
                res = [e]
        if not isinstance(res, (list, tuple)) or len(res) != 1:
            res = [RuntimeError(f"expected 1 completion, got {type(res).__name__}")]
        out = res[0]
        if isinstance(out, str):
            return out
        if not isinstance(out, BaseException):
            out = TypeError(f"completion is {type(out).__name__}, not str")
        if isinstance(out, TimeoutError) or getattr(out, "kind", None) == "timeout":
            self.stats.timeouts += 1
            return ChatRequestError(f"timeout: {str(out)[:300] or type(out).__name__}", kind="timeout")
        self.stats.backend_errors += 1
        return ChatRequestError(f"backend error: {type(out).__name__}: {str(out)[:300]}",
                                kind=getattr(out, "kind", "internal"), status=getattr(out, "status", None),
                                retryable=getattr(out, "retryable", True),
                                retry_after_s=getattr(out, "retry_after_s", 0.0))

    async def _judge_group(self, reqs: list[JudgeRequest], keys: list[tuple]) -> list[Judgment]:
        """One call for a group already in canonical order (`keys`: its members' group cache keys); the
        candidates its answer misses (or all, if the call failed) are re-judged one by one."""
        group_key = keys[0][:-1]  # ("group", version, context..., siblings): the set, without the member
        nonce = make_nonce(self._secret, group_key)
        t0 = time.perf_counter()
        self.stats.group_calls += 1
        reply = await self._call(build_group_messages(reqs, nonce), self.request_seed(group_key))
        text = reply if isinstance(reply, str) else ""
        lat = time.perf_counter() - t0
        parsed = parse_group_judgment(text, nonce, len(reqs))
        out: list[Optional[Judgment]] = []
        redo = []
        for i, p in enumerate(parsed):
            if p.ok:
                self.stats.latencies.append(lat)
                out.append(Judgment(scores=dict(p.scores), rationale=dict(p.rationale), raw=text[:MAX_RAW_CHARS],
                                    latency_s=lat))
            else:
                out.append(None)
                redo.append(i)
        if redo:
            self.stats.group_fallbacks += len(redo)
            singles = await asyncio.gather(*(self._judge_one(reqs[i], keys[i]) for i in redo))
            for i, j in zip(redo, singles):
                j.latency_s += lat
                out[i] = j
        return out  # type: ignore[return-value]
