"""The difficulty-aware split of Kardia-R1: easy samples go to SFT, hard ones to GRPO.

Each per-turn sample gets a RESOLUTION RATE in [0, 1]; samples with rate >= split.tau are easy
(DIR/easy.jsonl, for SFT), the rest hard (DIR/hard.jsonl, for GRPO). Two ways to get the rate:

1. Sampled (the default, for data without synthesis records): k = split.k answers of the reference
   policy at split.temperature, seeded by cfg.seed; the rate is the fraction whose unified reward is
   >= split.reward_threshold. The k rewards are saved, so the split can be redone for another threshold or
   tau without sampling again (`rates_from_rewards`, `apply_tau`). The reference policy is --model when
   given, else split.reference: `base` = model.path (method "sampled"), or `warmup` = K = split.folds
   cross-fitted warm-up SFTs, each rating only the dialogues (profiles) it never trained on (method
   "crossfit", see crossfit.py; an in-sample warm-up would rate memorisation, not difficulty).
2. From the data (split.use_data_difficulty, when EVERY sample carries one of these fields from
   synthesis; dialogue-level scalars, or lists with one value per assistant turn), mapped onto a
   resolution rate = 1 - p_FAIL, where p_FAIL is the share of the rubric evaluator's FAIL verdicts
   (method.md: a trajectory is easy iff p_FAIL < p_PASS + p_SOLVED, i.e. p_FAIL < 0.5):
   - `resolution_rate`: the rate itself;
   - `difficulty`: p_FAIL itself (0 = always passed, 1 = always failed): rate = 1 - difficulty;
   - `verdicts`: the evaluator's verdicts ("FAIL" / "PASS" / "SOLVED"): rate = 1 - #FAIL / #verdicts;
   - `fail_count` (or `refinement_rounds`) with `attempts`: rate = 1 - fail_count / attempts;
   - `refinement_rounds` alone: r revisions means r FAIL verdicts and a final passing one, so
     p_FAIL = r / (r + 1).
   With tau = 0.5 a trajectory with p_FAIL exactly 0.5 counts as easy here (rate >= tau) but hard under
   the paper's strict inequality; set split.tau slightly above 0.5 (e.g. 0.501) to reproduce it exactly.

Outputs: easy.jsonl / hard.jsonl (TurnSample.to_record, data order), split.json (method, K and the fold
models for crossfit, settings, sizes, every sample's rate, the sampled rewards, histogram counts and mean of
the rates), rates.png (the histogram with tau marked).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Optional, Sequence

from kardia_rl.curriculum.rating import rates_from_rewards, sample_rewards
from kardia_rl.data import TurnSample, expand_turns, label_set, load_dialogues
from kardia_rl.data.schema import VERDICTS, verdict_rate
from kardia_rl.errors import DataError, KardiaError

DATA_FIELDS = ("resolution_rate", "difficulty", "verdicts", "fail_count", "refinement_rounds")


# ------------------------------------------------------------------------------------------ data
def load_split_data(cfg, data: Optional[str] = None) -> tuple[list[TurnSample], dict[str, str]]:
    """Per-turn samples of `data` (default cfg.data.path), split as given, and dialogue id -> "PATH:LINE"."""
    path = data or cfg.data.path
    dialogues = load_dialogues(path, label_set(cfg.data.emotion_labels or None), cfg.data.span_notation,
                               cfg.data.hf_split)
    samples = [s for d in dialogues for s in expand_turns(d)]
    where: dict[str, list[str]] = {}
    for d in dialogues:
        where.setdefault(d.id, []).append(d.source)
    dup = next((i for i, srcs in where.items() if len(srcs) > 1), None)
    if dup is not None:  # ids are content hashes: a repeated dialogue would land in both splits' counts
        raise DataError(f"{path}: dialogues {' and '.join(where[dup])} share the id {dup!r}; remove the duplicate "
                        "or give them distinct 'id' fields so every sample lands in exactly one split")
    sources = {i: srcs[0] for i, srcs in where.items()}
    if not samples:
        raise DataError(f"{path}: no assistant turns to split")
    return samples, sources


def _per_turn(value: Any, sample: TurnSample, name: str, where: str) -> Any:
    """A dialogue-level value, or the sample's entry of a per-assistant-turn list."""
    nested = name == "verdicts" and isinstance(value, list) and value and isinstance(value[0], list)
    if (name != "verdicts" and isinstance(value, list)) or nested:
        if sample.turn >= len(value):
            raise DataError(f"{where}: field {name!r} has {len(value)} per-turn values but the dialogue has a turn "
                            f"{sample.turn}")
        return value[sample.turn]
    return value


def _number(value: Any, name: str, where: str, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        rng = f"[{lo:g}, {hi:g}]" if hi != math.inf else f">= {lo:g}"
        raise DataError(f"{where}: field {name!r} = {value!r} must be a number in {rng}")
    return float(value)


def data_rate(sample: TurnSample, where: str = "") -> Optional[tuple[float, str]]:
    """(resolution rate, field used) from the sample's synthesis fields, or None when it has none."""
    ex = sample.extra or {}
    where = where or f"sample {sample.id}"
    if "resolution_rate" in ex:
        return _number(_per_turn(ex["resolution_rate"], sample, "resolution_rate", where), "resolution_rate", where,
                       0, 1), "resolution_rate"
    if "difficulty" in ex:
        return 1.0 - _number(_per_turn(ex["difficulty"], sample, "difficulty", where), "difficulty", where, 0, 1), \
            "difficulty"
    if "verdicts" in ex:
        v = _per_turn(ex["verdicts"], sample, "verdicts", where)
        if not isinstance(v, list) or not v or any(str(x).upper() not in VERDICTS for x in v):
            raise DataError(f"{where}: field 'verdicts' = {v!r} must be a non-empty list of {'/'.join(VERDICTS)}")
        return verdict_rate(v), "verdicts"
    fail_key = "fail_count" if "fail_count" in ex else ("refinement_rounds" if "refinement_rounds" in ex else None)
    if fail_key is None:
        return None
    fails = _number(_per_turn(ex[fail_key], sample, fail_key, where), fail_key, where)
    if "attempts" in ex:
        attempts = _number(_per_turn(ex["attempts"], sample, "attempts", where), "attempts", where, 1)
        if fails > attempts:
            raise DataError(f"{where}: {fail_key} = {fails:g} exceeds attempts = {attempts:g}")
        return 1.0 - fails / attempts, f"{fail_key}/attempts"
    if fail_key == "fail_count":
        raise DataError(f"{where}: field 'fail_count' needs 'attempts' (the number of evaluator verdicts)")
    return 1.0 - fails / (fails + 1.0), "refinement_rounds"


def data_rates(samples: Sequence[TurnSample], sources: Optional[dict] = None) -> Optional[tuple[dict, dict]]:
    """(id -> rate, field -> count) when every sample carries synthesis fields; None when none does."""
    got = {}
    for s in samples:
        r = data_rate(s, f"{(sources or {}).get(s.dialogue_id) or 'dialogue ' + s.dialogue_id} (sample {s.id})")
        got[s.id] = r
    have = [i for i, r in got.items() if r is not None]
    if not have:
        return None
    if len(have) != len(samples):
        missing = [i for i, r in got.items() if r is None]
        raise DataError(f"{len(missing)} of {len(samples)} samples have no difficulty field ({', '.join(DATA_FIELDS)}) "
                        f"while the others do, e.g. {missing[:3]}; fill them in or set split.use_data_difficulty=false "
                        "to estimate every rate by sampling")
    fields: dict[str, int] = {}
    for r in got.values():
        fields[r[1]] = fields.get(r[1], 0) + 1
    return {i: r[0] for i, r in got.items()}, fields


def apply_tau(rates: dict[str, float], tau: float) -> tuple[list[str], list[str]]:
    """(easy ids: rate >= tau, hard ids: the rest), each in the order of `rates`."""
    easy = [i for i, r in rates.items() if r >= tau]
    hard = [i for i, r in rates.items() if r < tau]
    return easy, hard


def histogram(rates: Sequence[float], k: Optional[int] = None, bins: int = 10) -> list[dict]:
    """Counts per rate: one point bin per value j/k for sampled rates, else `bins` equal bins on [0, 1]."""
    if k:
        return [{"lo": j / k, "hi": j / k, "count": sum(1 for r in rates if abs(r - j / k) < 1e-9)}
                for j in range(k + 1)]
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        out.append({"lo": lo, "hi": hi, "count": sum(1 for r in rates if lo <= r < hi or (b == bins - 1 and r == hi))})
    return out


def plot_rates(hist: list[dict], tau: float, title: str, path: str) -> None:
    from kardia_rl.utils.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    points = all(h["lo"] == h["hi"] for h in hist)
    width = (1 / max(1, len(hist) - 1) * 0.8) if points else (hist[0]["hi"] - hist[0]["lo"]) * 0.95
    xs = [h["lo"] if points else (h["lo"] + h["hi"]) / 2 for h in hist]
    ax.bar(xs, [h["count"] for h in hist], width=width, color="#4c72b0")
    if points:  # sampled rates take the values j/k only: label exactly those
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:.2f}" for x in xs])
    ax.axvline(tau, color="#c44e52", linestyle="--", label=f"tau = {tau:g} (easy: rate >= tau)")
    ax.set_xlabel("resolution rate")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------ driver
def write_split(out_dir: str, samples: Sequence[TurnSample], rates: dict[str, float], tau: float, meta: dict) -> dict:
    """easy.jsonl, hard.jsonl, split.json, rates.png; returns split.json's dict."""
    from kardia_rl.utils.io import atomic_write_jsonl, write_json

    easy_ids, hard_ids = apply_tau(rates, tau)
    easy_set = set(easy_ids)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_jsonl(os.path.join(out_dir, "easy.jsonl"), [s.to_record() for s in samples if s.id in easy_set])
    atomic_write_jsonl(os.path.join(out_dir, "hard.jsonl"), [s.to_record() for s in samples if s.id not in easy_set])
    hist = histogram(list(rates.values()), meta.get("k") if meta.get("method") != "data" else None)
    values = list(rates.values())
    doc = {**meta, "tau": tau,
           "sizes": {"total": len(samples), "easy": len(easy_ids), "hard": len(hard_ids)},
           "rate_mean": sum(values) / len(values), "histogram": hist, "rates": dict(rates),
           "files": {"easy": "easy.jsonl", "hard": "hard.jsonl", "plot": "rates.png"}}
    if "rewards" in meta:  # keep the big per-sample table last in the file
        doc["rewards"] = doc.pop("rewards")
    write_json(os.path.join(out_dir, "split.json"), doc)
    plot_rates(hist, tau, f"Resolution rates ({meta.get('method')}, n={len(samples)})", os.path.join(out_dir, "rates.png"))
    return doc


def split_samples(cfg, samples: Sequence[TurnSample], model_path: Optional[str], out_dir: str, *,
                  progress: bool = True, sources: Optional[dict] = None, data: str = "", pools=None,
                  work_dir: Optional[str] = None) -> dict:
    """The split of `samples` written into out_dir (see the module docstring); returns split.json's dict.

    The rater: `model_path` when given; else split.reference: base = model.path, warmup = K cross-fitted
    warm-ups (crossfit.py) whose models go to work_dir (default OUT_DIR/reference_models).
    The rating runs on Ray pools (cluster.stage_pools): `pools` when given (left open), else the split's own,
    released before this returns.
    """
    samples = list(samples)
    if not samples:
        raise KardiaError("split: no samples")
    t0 = time.perf_counter()
    from_data = data_rates(samples, sources) if cfg.split.use_data_difficulty else None
    if from_data is not None:
        rates, fields = from_data
        meta = {"method": "data", "data": data, "fields": fields, "seed": cfg.seed}
    else:
        from kardia_rl.model.prepare import prepared_path, with_prepared_model

        # standalone `kardia-rl split` may name a hub id or .gguf: the rater loads a prepared folder
        if model_path is not None:
            model_path = prepared_path(cfg, model_path, "--model")
        else:
            cfg = with_prepared_model(cfg)
        if model_path is None and cfg.split.reference == "warmup":
            from kardia_rl.curriculum.crossfit import crossfit_rewards

            rewards, info = crossfit_rewards(cfg, samples, work_dir or os.path.join(out_dir, "reference_models"),
                                             progress=progress, pools=pools)
            timing = {"folds": [f.pop("timing") for f in info["fold_models"]]}
            timing["total_s"] = round(sum(t["total_s"] for t in timing["folds"]), 3)
            how = {"method": "crossfit", **info}
        else:
            model_path = model_path or cfg.model.path
            rewards, timing = sample_rewards(cfg, samples, model_path, progress=progress, pools=pools)
            how = {"method": "sampled", "model": model_path}
        rates = rates_from_rewards(rewards, cfg.split.reward_threshold)
        meta = {**how, "data": data, "k": cfg.split.k,
                "reward_threshold": cfg.split.reward_threshold, "temperature": cfg.split.temperature,
                "top_p": cfg.rollout.top_p, "max_new_tokens": cfg.model.max_new_tokens, "seed": cfg.seed,
                "judge": cfg.judge.backend,
                "reward_weights": {"format": cfg.reward.format_weight, "emotion": cfg.reward.emotion_weight,
                                   "rubric": cfg.reward.rubric_weight},
                "timing": timing, "rewards": rewards}
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return write_split(out_dir, samples, rates, cfg.split.tau, meta)
