"""RubricJudge: an LLM judge (any ChatBackend) scoring the five rubric dimensions in one call.

Per request: cache lookup -> prompt with a nonce (rubric_prompt.py) -> backend call under a semaphore
(`max_in_flight`) and a timeout -> tolerant parse (rubric_parse.py) -> on a parse failure a re-ask that
shows the judge its answer and the reason, on a timeout/backend error a plain retry, with exponential
backoff (`backoff_s * 2**k`) -> after `max_retries` retries a failed Judgment (ok=False, fallback=True,
error set, scores None). The fallback VALUE is chosen by the caller that knows the group
(UnifiedReward: neutral/zero/midpoint); this class never raises for a per-request failure and never
invents a score.

Group-wise mode (`group_wise=True`): the unique candidates of one call sharing a non-empty group_id and
context are scored in one call (numbered, each in its own nonce-marked quote, so the judge sees the
contrast and the backend sees one long prompt instead of N), in an order fixed by the judge seed and the
set (a keyed hash of each response), never by arrival order; candidates the group answer does not cover
are re-judged one by one. The output has the same shape as per-candidate mode. A group judgment is cached
under a key that holds the whole sibling set and is served whole or re-judged whole (cache.py).

Reproducibility: the judge seed (the run's `seed`, the same in every judge actor) and the request alone
decide the prompt's nonce and the backend's sampling seed (`request_seed`: a hash of the seed, the cache
key and the attempt number), so a request gives the same prompt and the same sampling whichever actor
serves it, in whichever batch, and also when it is re-sent after an actor died.

Transport retries: a backend that retries by itself (it has an int `max_retries`, like
OpenAIChatBackend with its per-attempt timeout, backoff and Retry-After handling) owns transport
failures: RubricJudge then re-asks only on parse failures (otherwise attempts would multiply, e.g.
4 x 4 against a dead server) and its outer timeout covers all of the backend's attempts
(`timeout_s * (r + 1) + backoff_s * 2**r`). Backends without retries (vllm, hf, test doubles) get
RubricJudge's retry loop for timeouts and errors too.

Duplicate requests in one batch are judged once (the copies count as cache hits), which matters for GRPO
groups where a policy repeats itself.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from kardia_rl.rewards.cache import JudgmentCache
from kardia_rl.rewards.judge.base import (
    DIMENSIONS, SCORE_MAX, SCORE_MIN, ChatBackend, JudgeBackend, Judgment, JudgeRequest,
)
from kardia_rl.monitoring.stats import percentile
from kardia_rl.rewards.rubric_parse import parse_group_judgment, parse_judgment
from kardia_rl.rewards.rubric_prompt import (
    build_group_messages, build_judge_messages, make_nonce, reask_message, rubric_version_hash,
)

log = logging.getLogger(__name__)
MAX_RAW_CHARS = 2000


def aggregate_scores(scores: Mapping[str, Optional[float]], weights: Optional[Mapping[str, float]] = None
                     ) -> Optional[float]:
    """Weighted mean of the 1-5 scores mapped to [0, 1]: sum_d w_d (s_d - 1) / 4 / sum_d w_d.

    Dimensions with weight 0 are ignored; None when a weighted dimension has no score (a failed judgment
    must be handled by a fallback, never silently aggregated)."""
    w = {d: float((weights or {}).get(d, 1.0)) for d in DIMENSIONS}  # an omitted dimension keeps weight 1
    total = sum(v for v in w.values() if v > 0)
    if total <= 0:
        raise ValueError(f"dimension weights sum to 0: {dict(w)}")
    acc = 0.0
    for d, wd in w.items():
        if wd <= 0:
            continue
        s = scores.get(d)
        if s is None:
            return None
        acc += wd * (min(SCORE_MAX, max(SCORE_MIN, float(s))) - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)
    return acc / total


def failed_judgment(error: str, raw: str = "", latency_s: float = 0.0, attempts: int = 0) -> Judgment:
    return Judgment(scores={d: None for d in DIMENSIONS}, ok=False, error=error[:500], raw=raw[:MAX_RAW_CHARS],
                    latency_s=latency_s, attempts=attempts, fallback=True)


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

    def __init__(self, chat: ChatBackend, *, weights: Optional[Mapping[str, float]] = None, max_in_flight: int = 16,
                 timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 0.5, temperature: float = 0.0,
                 max_tokens: int = 512, cache_size: int = 4096, group_wise: bool = False,
                 seed: Optional[int] = 0):
        if max_in_flight < 1 or timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(f"RubricJudge: need max_in_flight >= 1, timeout_s > 0, max_retries >= 0, backoff_s >= 0; "
                             f"got {max_in_flight}, {timeout_s}, {max_retries}, {backoff_s}")
        self.chat = chat
        self.weights = dict(weights) if weights else {d: 1.0 for d in DIMENSIONS}
        self.max_in_flight, self.timeout_s = max_in_flight, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self.group_wise, self.seed = group_wise, seed
        self.cache = JudgmentCache(cache_size) if cache_size > 0 else None
        # The nonce secret: deterministic for a seed (reproducible prompts); the candidate never sees it.
        self._secret = f"seed={seed}" if seed is not None else secrets.token_hex(16)
        # single vs group is part of every cache key (JudgeRequest.cache_key), not of the version
        self.version = rubric_version_hash(f"{chat.name}|{_backend_model_name(chat)}")
        backend_retries = getattr(chat, "max_retries", None)
        self.backend_retries = backend_retries if isinstance(backend_retries, int) and backend_retries >= 0 else None
        # A backend with its own retries also owns per-attempt timeouts, Retry-After and rate-limit waits, and
        # is bounded by them; an outer timeout here would cut off requests that are only queued behind the rate
        # limiter and miscount them as judge timeouts. Only backends without retries get our timeout.
        self.call_timeout_s = None if self.backend_retries is not None else timeout_s
        self.stats = JudgeStats()
        self._sem: Optional[asyncio.Semaphore] = None
        self._sem_loop = None

    @classmethod
    def from_config(cls, chat: ChatBackend, cfg_judge, seed: Optional[int] = 0) -> "RubricJudge":
        return cls(chat, weights=cfg_judge.dimension_weights, max_in_flight=cfg_judge.max_in_flight,
                   timeout_s=cfg_judge.timeout_s, max_retries=cfg_judge.max_retries, backoff_s=cfg_judge.backoff_s,
                   temperature=cfg_judge.temperature, max_tokens=cfg_judge.max_tokens,
                   cache_size=cfg_judge.cache_size, group_wise=cfg_judge.group_wise, seed=seed)

    def aggregate(self, judgment: Judgment) -> Optional[float]:
        return aggregate_scores(judgment.scores, self.weights) if judgment.ok else None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:  # a semaphore is bound to one event loop
            self._sem, self._sem_loop = asyncio.Semaphore(self.max_in_flight), loop
        return self._sem

    async def close(self) -> None:
        await self.chat.close()

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
        return sorted(range(len(responses)), key=lambda i: (
            hashlib.sha256(f"{self._secret}|{responses[i]}".encode("utf-8")).digest(), responses[i]))

    async def _call(self, conv: list[dict], seed: Optional[int]) -> tuple[Optional[str], Optional[str]]:
        """(text, None) or (None, error) for one backend call, bounded by the semaphore and the timeout."""
        async with self._semaphore():
            self.stats.calls += 1
            try:
                res = await asyncio.wait_for(
                    self.chat.complete([conv], temperature=self.temperature, max_tokens=self.max_tokens,
                                       seed=seed), self.call_timeout_s)
            except asyncio.TimeoutError:
                self.stats.timeouts += 1
                return None, f"timeout after {self.call_timeout_s}s"
            except Exception as e:  # noqa: BLE001 - any backend failure is a failed attempt, never a crash
                self.stats.backend_errors += 1
                return None, f"backend error: {type(e).__name__}: {str(e)[:300]}"
        if not isinstance(res, (list, tuple)) or len(res) != 1:
            self.stats.backend_errors += 1
            return None, f"backend error: expected 1 completion, got {type(res).__name__}"
        out = res[0]
        if isinstance(out, BaseException):
            self.stats.backend_errors += 1
            return None, f"backend error: {type(out).__name__}: {str(out)[:300]}"
        if not isinstance(out, str):
            self.stats.backend_errors += 1
            return None, f"backend error: completion is {type(out).__name__}, not str"
        return out, None

    async def _judge_one(self, req: JudgeRequest, key: tuple) -> Judgment:
        nonce = make_nonce(self._secret, key)
        base = build_judge_messages(req, nonce)
        conv, err, raw = base, "no attempt", ""
        t0 = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            text, call_err = await self._call(conv, self.request_seed(key, attempt))
            if text is None:
                err = call_err or "backend error"
                if self.backend_retries is not None:
                    break  # the backend already retried this transport failure
                continue
            raw = text
            parsed = parse_judgment(text, nonce)
            if parsed.ok:
                lat = time.perf_counter() - t0
                self.stats.latencies.append(lat)
                return Judgment(scores=dict(parsed.scores), rationale=dict(parsed.rationale), raw=text[:MAX_RAW_CHARS],
                                latency_s=lat, attempts=attempt + 1)
            self.stats.parse_failures += 1
            err = f"parse error: {parsed.error}"
            conv = base + [{"role": "assistant", "content": text[:MAX_RAW_CHARS]}, reask_message(parsed.error, nonce)]
        self.stats.failures += 1
        return failed_judgment(err, raw, time.perf_counter() - t0, attempt + 1)

    async def _judge_group(self, reqs: list[JudgeRequest], keys: list[tuple]) -> list[Judgment]:
        """One call for a group already in canonical order; `keys` are its members' group cache keys."""
        group_key = keys[0][:-1]  # ("group", version, context..., siblings): the set, without the member
        nonce = make_nonce(self._secret, group_key)
        t0 = time.perf_counter()
        self.stats.group_calls += 1
        text, _ = await self._call(build_group_messages(reqs, nonce), self.request_seed(group_key))
        lat = time.perf_counter() - t0
        parsed = parse_group_judgment(text or "", nonce, len(reqs))
        out: list[Optional[Judgment]] = []
        redo = []
        for i, p in enumerate(parsed):
            if p.ok:
                self.stats.latencies.append(lat)
                out.append(Judgment(scores=dict(p.scores), rationale=dict(p.rationale),
                                    raw=(text or "")[:MAX_RAW_CHARS], latency_s=lat))
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

    # ------------------------------------------------------------------------------------------ public
    def _plan(self, reqs: list[JudgeRequest]) -> tuple[list[tuple[list[int], list[tuple]]], list[tuple]]:
        """(units, the cache key of every request). A unit is ([request index per unique candidate], [their
        keys]): several candidates are one group call (in canonical order), one candidate a single call.
        Duplicates (same key) are in no unit: they get a copy of their first occurrence's judgment."""
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

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgment]:
        reqs = list(requests)
        self.stats.requests += len(reqs)
        out: list[Optional[Judgment]] = [None] * len(reqs)
        try:
            units, keys = self._plan(reqs)
            jobs, job_units = [], []
            for idx, ukeys in units:
                if self.cache is not None:
                    hit = self.cache.get(ukeys[0]) if len(ukeys) == 1 else self.cache.get_all(ukeys)
                    if hit is not None:
                        for i, j in zip(idx, [hit] if len(ukeys) == 1 else hit):
                            out[i] = j
                        continue
                jobs.append(self._judge_one(reqs[idx[0]], ukeys[0]) if len(idx) == 1
                            else self._judge_group([reqs[i] for i in idx], ukeys))
                job_units.append((idx, ukeys))
            results = await asyncio.gather(*jobs)
            for (idx, ukeys), res in zip(job_units, results):
                for i, k, j in zip(idx, ukeys, [res] if len(idx) == 1 else res):
                    out[i] = j
                    if self.cache is not None:
                        self.cache.put(k, j)
            first = {ukeys[n]: i for idx, ukeys in units for n, i in enumerate(idx)}
            for i in range(len(reqs)):  # duplicates in the batch: a copy, counted as a cache hit
                if out[i] is None:
                    src = out[first[keys[i]]]
                    dup = copy.deepcopy(src)
                    if src.ok:
                        dup.cached, dup.latency_s = True, 0.0
                        if self.cache is not None:
                            self.cache.record_hit()
                    out[i] = dup
        except Exception as e:  # noqa: BLE001 - a bug here must not crash training: fail the rest, loudly
            log.exception("RubricJudge.judge failed")
            for i, j in enumerate(out):
                if j is None:
                    self.stats.failures += 1
                    out[i] = failed_judgment(f"internal judge error: {type(e).__name__}: {e}")
        return out  # type: ignore[return-value]
