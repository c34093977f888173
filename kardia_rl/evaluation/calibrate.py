"""`kardia-rl judge-calibrate`: fit a calibration head for the embedding judge on human-labelled sets.

    kardia-rl judge-calibrate [CONFIG] --data PATH --format epitome|esconv|jsonl|pairs [--data PATH2 --format F2 ...]
                              --out HEAD [--limit N] [key=value ...]

Steps: read each set (evaluation/human_data.py), split it once and for all by context (calibrate_fit.is_held_out:
80/20 on a hash of the context id, seed 0), embed contexts and responses with the judge's encoder, fit one
pairwise head per dimension on the TRAINING parts of all sets together (calibrate_fit.py says why pairwise), and
measure on each set's HELD-OUT part: the calibrated head, the uncalibrated embedding judge (the proxy scores of
the same items, so the two are compared on the same pairs) and, with two or more sets, the head fitted on the
other sets only (does it transfer?) and on that set only. The head file gets those numbers, the split, the sources
and their licence note; it is written atomically. Bad input: one line naming the file, key or option, exit 2.

The head is fitted from data whose licence restricts its use (EPITOME: non-commercial research; ESConv: CC BY-NC
4.0): the project ships no head; each user fits one from their own copy, and the file records the sources.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Sequence

import numpy as np

from kardia_rl.config.cli import add_config_args, config_from_args
from kardia_rl.errors import DataError, KardiaError
from kardia_rl.evaluation.calibrate_fit import SPLIT_SEED, TEST_FRACTION, fit_dimension, is_held_out
from kardia_rl.evaluation.human_data import HUMAN_FORMATS, HumanItem, level_range, load_human_items

LICENCE_NOTES = {
    "epitome": "EPITOME (Sharma et al. 2020): code BSD-3-Clause, model licence non-commercial academic research "
               "only; Reddit posts published for research",
    "esconv": "ESConv (Liu et al. 2021): CC BY-NC 4.0, academic research use only",
    "jsonl": "user data: the user's own licence",
    "pairs": "user data: the user's own licence",
}
HEAD_NOTE = ("A head fitted on a set carries that set's licence: with EPITOME or ESConv, non-commercial research "
             "use only. Do not ship or sell it; fit your own from your copy of the data.")


def configure(p: argparse.ArgumentParser) -> None:
    add_config_args(p, example="judge.batch_size=8")
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="a human-labelled set (repeat for several; each followed by its --format)")
    p.add_argument("--format", action="append", required=True, choices=HUMAN_FORMATS, dest="formats",
                   help="format of the --data before it: " + " | ".join(HUMAN_FORMATS))
    p.add_argument("--out", required=True, metavar="HEAD", help="the head file to write (JSON)")
    p.add_argument("--limit", type=int, action="append", default=None, metavar="N",
                   help="read only the first N items of a set (tests): once for every set, or once per --data")


def _metrics(items: Sequence[HumanItem], dim: str, scores: Sequence[float], gaps: Sequence[float]) -> dict:
    from kardia_rl.evaluation.human_metrics import agreement_with_humans

    m = agreement_with_humans([it.levels[dim] for it in items], list(scores), [it.context_id for it in items],
                              level_range(list(items), dim), min_gaps=gaps, n_boot=200)
    return {"n_items": m["n_items"], "spearman": _r(m["spearman"]),
            "pairwise": {f"gap>={p['min_gap']:g}": {"accuracy": _r(p["accuracy"]), "n_pairs": p["n_pairs"],
                                                     "ci95": [_r(x) for x in p["accuracy_ci"] or []],
                                                     "tie_rate": _r(p["tie_rate"])}
                         for p in m["pairwise"]}}


def _r(x):
    return None if x is None else round(float(x), 4)


def calibrate(sets: list[tuple[str, str, list[HumanItem]]], encode, proxy_judge=None, log=print) -> tuple:
    """(CalibrationHead, validation dict) from [(path, format, items)]; `encode` embeds texts (normalised)."""
    from kardia_rl.evaluation.judge_probes import item_request  # the requests judge-validate sends
    from kardia_rl.rewards.judge.calibration import CalibrationHead, DimensionHead, features

    items = [it for _, _, its in sets for it in its]
    set_of = np.array([k for k, (_, _, its) in enumerate(sets) for _ in its])
    held = np.array([is_held_out(it.context_id) for it in items])
    t0 = time.perf_counter()
    ctx = encode([it.context for it in items])
    resp = encode([it.response for it in items])
    x = features(ctx, resp, [it.response for it in items])
    embed_s = time.perf_counter() - t0
    log(f"[calibrate] embedded {len(items)} items in {embed_s:.1f} s ({1000 * embed_s / len(items):.1f} ms/item)")
    dims = [d for d in dict.fromkeys(d for it in items for d in it.levels)]
    proxy = {}
    if proxy_judge is not None:  # the uncalibrated judge on the held-out items, for the comparison
        idx = np.flatnonzero(held)
        js = proxy_judge.score_batch([item_request(items[i]) for i in idx])
        proxy = {i: j.scores for i, j in zip(idx, js)}

    def fit(dim: str, train: np.ndarray) -> dict:
        y = np.array([items[i].levels[dim] for i in train])
        return fit_dimension(x[train], y, set_of[train], [items[i].context_id for i in train])

    heads, validation = {}, {"split": {"seed": SPLIT_SEED, "test_fraction": TEST_FRACTION,
                                       "unit": "context_id (sha256 of 'seed:context_id')"}, "held_out": {},
                                       "headline": {}}
    for dim in dims:
        has = np.array([dim in it.levels for it in items])
        train = np.flatnonzero(has & ~held)
        if len(train) < 4 or len({items[i].levels[dim] for i in train}) < 2:
            log(f"[calibrate] {dim}: skipped ({len(train)} training items, not two different levels among them): "
                f"the judge keeps its proxy score for {dim}")
            continue
        f = fit(dim, train)
        heads[dim] = DimensionHead(f["mean"], f["scale"], f["weights"], f["mid"], f["spread"])
        validation.setdefault("fit", {})[dim] = {"l2": f["lam"], "set_power": f["power"], "n_train": len(train)}
        log(f"[calibrate] {dim}: {len(train)} training items, L2 {f['lam']:g}, set power {f['power']:g} "
            f"(CV accuracy: {f['cv']})")
        for k, (path, fmt, its) in enumerate(sets):
            test = np.flatnonzero(has & held & (set_of == k))
            if len(test) < 2:
                continue
            test_items = [items[i] for i in test]
            lo, hi = level_range(test_items, dim)
            gaps = (0.0, 2.0) if hi - lo >= 3 else (0.0,)
            entry = {"calibrated": _metrics(test_items, dim, heads[dim].score(x[test]), gaps)}
            if proxy:
                entry["uncalibrated"] = _metrics(test_items, dim, [proxy[i][dim] for i in test], gaps)
            if len(sets) > 1:
                for name, mask in (("this_set_only", set_of == k), ("other_sets_only", set_of != k)):
                    tr = np.flatnonzero(has & ~held & mask)
                    if len(tr) >= 4 and len(np.unique([items[i].levels[dim] for i in tr])) > 1:
                        g = fit(dim, tr)
                        s = DimensionHead(g["mean"], g["scale"], g["weights"], g["mid"], g["spread"]).score(x[test])
                        entry[name] = _metrics(test_items, dim, s, gaps)
            validation["held_out"].setdefault(f"{fmt}:{os.path.basename(os.path.normpath(path))}", {})[dim] = entry
            for g in gaps:
                key = f"{fmt} {dim} gap>={g:g}"
                validation["headline"][key] = entry["calibrated"]["pairwise"][f"gap>={g:g}"]["accuracy"]
    if not heads:
        raise DataError(f"--data {', '.join(p for p, _, _ in sets)}: no rubric dimension has training items at two "
                        f"different levels: nothing to calibrate")
    info = {"objective": "pairwise logistic (RankNet), gap-weighted, per-set pairs weighted by set size ** p, "
                         "L2 and p by 4-fold CV over contexts",
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "sources": [{"path": os.path.abspath(p), "format": fmt, "n_items": len(its),
                         "n_train": int(sum(1 for it in its if not is_held_out(it.context_id))),
                         "licence": LICENCE_NOTES[fmt]} for p, fmt, its in sets],
            "licence_note": HEAD_NOTE, "embed_ms_per_item": round(1000 * embed_s / len(items), 2),
            "validation": validation}
    return CalibrationHead("minilm", heads, info), validation


def cmd_judge_calibrate(args: argparse.Namespace) -> int:
    from kardia_rl.rewards.judge.embedding import EmbeddingJudge

    cfg = config_from_args(args)
    if len(args.data) != len(args.formats):
        raise KardiaError(f"--data/--format: {len(args.data)} --data but {len(args.formats)} --format; give one "
                          f"--format after each --data")
    if os.path.isdir(args.out):
        raise KardiaError(f"--out {args.out}: is a folder; give the head's file name (e.g. {args.out}/head.json)")
    limits = args.limit or [None]
    if len(limits) not in (1, len(args.data)):
        raise KardiaError(f"--limit: give it once (every set) or once per --data ({len(args.data)}), got {len(limits)}")
    limits = limits * len(args.data) if len(limits) == 1 else limits
    sets = [(p, f, load_human_items(p, f, n)) for p, f, n in zip(args.data, args.formats, limits)]
    judge = EmbeddingJudge(cache_size=0)  # the uncalibrated judge: its encoder and its proxy scores
    head, validation = calibrate(sets, judge.encode, proxy_judge=judge)
    try:
        digest = head.save(args.out)
    except OSError as e:
        raise KardiaError(f"--out {args.out}: cannot write the head ({e.strerror})") from None
    print(render_validation(validation))
    print(f"wrote {args.out} (sha256 {digest[:12]}); use it with judge.calibration={args.out}")
    return 0


cmd_judge_calibrate.configure = configure


def render_validation(validation: dict) -> str:
    """Held-out pairwise accuracy per set and dimension: calibrated, uncalibrated, cross-set (Markdown table)."""
    cols = ("calibrated", "uncalibrated", "this_set_only", "other_sets_only")
    lines = ["| set | dimension | pairs | " + " | ".join(cols) + " |", "|---|---|---|" + "---:|" * len(cols)]
    for src, by_dim in validation["held_out"].items():
        for dim, entry in by_dim.items():
            for gap, p in entry["calibrated"]["pairwise"].items():
                cells = [f"{entry[c]['pairwise'][gap]['accuracy']:.3f}" if c in entry else "–" for c in cols]
                lines.append(f"| {src} | {dim} | {gap} ({p['n_pairs']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
