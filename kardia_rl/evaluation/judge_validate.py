"""`kardia-rl judge-validate`: how far a judge agrees with human raters, and how it reacts to bias probes.

    kardia-rl judge-validate [CONFIG] --data PATH --format epitome|esconv|pairs|jsonl [--limit N] [--min-gap G]
                             [--probes] [--probe-items N] --out DIR [key=value ...]

The items (evaluation/human_data.py) are scored by the judge the config names (any backend), on the Ray judge
pool as in training (cluster/judge_pool.py: judge.num_actors actors, a local Ray cluster on 127.0.0.1 unless
RAY_ADDRESS names one). Per rubric dimension with human levels: pairwise accuracy, Spearman, quadratic-weighted
kappa with bootstrap 95% intervals, tie rate (evaluation/human_metrics.py); with --probes, the bias probes
(evaluation/judge_probes.py) on the first --probe-items items. Writes DIR/report.md and DIR/validation.json
(atomic). The report names the judge: backend, model, prompt hash, rubric version.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Optional

from kardia_rl.config.cli import add_config_args, config_from_args
from kardia_rl.errors import KardiaError
from kardia_rl.rewards.judge.base import DIMENSIONS
from kardia_rl.rewards.judge.identity import judge_identity, judge_identity_line

DEFAULT_PROBE_ITEMS = 50


def configure(p: argparse.ArgumentParser) -> None:
    from kardia_rl.evaluation.human_data import HUMAN_FORMATS

    add_config_args(p, example="judge.backend=vllm judge.model=DIR")
    p.add_argument("--data", required=True, help="human-labelled set: a file or folder (see --format)")
    p.add_argument("--format", required=True, choices=HUMAN_FORMATS, dest="fmt",
                   help="epitome (folder of the 3 CSVs) | esconv (JSON lines or their folder) | jsonl "
                        "({context, response, levels}) | pairs ({context, chosen, rejected}); docs/judges.md")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--min-gap", type=float, default=2.0,
                   help="also report pairwise accuracy over pairs whose human levels differ by at least this "
                        "(default 2; 0 = only all differing pairs)")
    p.add_argument("--probes", action="store_true", help="run the bias probes (verbosity, echo, position, "
                                                         "injection, benign drift)")
    p.add_argument("--probe-items", type=int, default=DEFAULT_PROBE_ITEMS,
                   help=f"items the probes use (the first N; default {DEFAULT_PROBE_ITEMS})")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--out", required=True, help="output folder (report.md, validation.json)")


def _pool(cfg):
    from kardia_rl.cluster.judge_pool import JudgePool

    return JudgePool(cfg)


def validate(cfg, items, *, min_gaps=(0.0,), probes: bool = False, probe_items: int = DEFAULT_PROBE_ITEMS,
             seed: int = 0, config_path: Optional[str] = None, overrides: tuple = (), progress: bool = True) -> dict:
    """Score `items` on judge pools built from `cfg` (Ray must be up) and return the report document."""
    from kardia_rl.config import load_config
    from kardia_rl.evaluation.human_data import dimensions_of, level_range
    from kardia_rl.evaluation.human_metrics import agreement_with_humans
    from kardia_rl.evaluation.judge_probes import VARIANT_OVERRIDES, item_request, judge_all, run_probes

    identity = judge_identity(cfg.judge)  # before any pool: a bad judge.calibration head is one line here
    pools: dict = {}

    def judge_for(variant: str):
        if variant not in pools:
            vcfg = cfg if variant == "base" else load_config(config_path, list(overrides) + VARIANT_OVERRIDES[variant])
            pools[variant] = _pool(vcfg)
        return pools[variant]

    t0 = time.perf_counter()
    try:
        judgments = judge_all(judge_for("base"), [item_request(it) for it in items])
        t_score = time.perf_counter() - t0
        dims = {}
        for d in dimensions_of(items):
            idx = [i for i, it in enumerate(items) if d in it.levels]
            sub = [items[i] for i in idx]
            dims[d] = agreement_with_humans([it.levels[d] for it in sub],
                                            [judgments[i].scores.get(d) if judgments[i].ok else None for i in idx],
                                            [it.context_id for it in sub], level_range(sub, d),
                                            min_gaps=min_gaps, seed=seed)
        probe_rows = None
        if probes:
            n = min(probe_items, len(items))
            probe_rows = run_probes(items[:n], judge_for, base=judgments[:n])
    finally:
        for p in pools.values():
            p.shutdown()
    kinds: dict = {}
    for j in judgments:
        if not j.ok:  # "timeout: ...", "parse error: ...": counted by the part before the first colon
            kind = (j.error or "unknown").split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    return {"judge": identity, "n_items": len(items), "judge_failures": sum(kinds.values()),
            "failure_kinds": kinds, "first_failure": next((j.error for j in judgments if not j.ok), None),
            "dimensions": dims, "probes": probe_rows, "score_seconds": round(t_score, 1),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _fmt(x, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ci(c) -> str:
    return "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"


def render_report(doc: dict) -> str:
    j = doc["judge"]
    lines = [f"# Judge validation: {j['backend']} judge against human ratings", "",
             f"- {judge_identity_line(j)}" + (f" ({j['note']})" if j.get("note") else "")
             + ("" if j.get("defences", True) else "; injection defences OFF (judge.defences=false)"),
             f"- data: `{doc['data']}` (format {doc['format']}), {doc['n_items']} items"
             + (f", first {doc['limit']}" if doc.get("limit") else ""),
             f"- judge failures: {doc['judge_failures']}" + (f" {doc['failure_kinds']} (first: {doc['first_failure']})"
                                                             if doc['first_failure'] else ""),
             f"- scored in {doc['score_seconds']} s; {doc['date']}", "",
             "## Agreement with the human levels (95% bootstrap intervals)", "",
             "| dimension | items | pairs (mode) | pairwise acc | tie rate | pairs gap>=G: acc | Spearman | QWK |",
             "|---|---|---|---|---|---|---|---|"]
    for d, m in doc["dimensions"].items():
        p0 = m["pairwise"][0]
        pg = m["pairwise"][1] if len(m["pairwise"]) > 1 else None
        gap = (f"G={pg['min_gap']:g}: {_fmt(pg['accuracy'])}{_ci(pg['accuracy_ci'])} ({pg['n_pairs']})"
               if pg else "-")
        lines.append(f"| {d} | {m['n_items']} | {p0['n_pairs']} ({p0['mode']}) | {_fmt(p0['accuracy'])}"
                     f"{_ci(p0['accuracy_ci'])} | {_fmt(p0['tie_rate'])} | {gap} | {_fmt(m['spearman'])}"
                     f"{_ci(m['spearman_ci'])} | {_fmt(m['kappa'])}{_ci(m['kappa_ci'])} |")
    lines += ["", "Pairwise accuracy: the higher human level ranked higher, judge ties count one half, chance 0.5; "
              "pairs within a context when the data has several replies per context, else all pairs. QWK maps the "
              "judge's 1-5 onto the human scale. docs/judges.md explains every number."]
    if doc.get("probes"):
        lines += ["", "## Bias probes (mean score change on the 1-5 scale; flagged when over budget)", "",
                  "| probe | n | " + " | ".join(DIMENSIONS) + " | value | budget | verdict |",
                  "|---" * (len(DIMENSIONS) + 5) + "|"]
        for p in doc["probes"]:
            ch = " | ".join(_fmt(v, 2) for v in p["changes"].values())
            lines.append(f"| {p['probe']} | {p['n']} | {ch} | {_fmt(p['value'])} | {p['budget']} | "
                         f"{'FLAGGED' if p['flagged'] else 'ok'} |")
        lines += ["", "verbosity, echo: mean signed change (padding/echo should not help); position, benign drift: "
                  "mean |change|; injection: value = share of (reply, attack) pairs whose mean score rose by more "
                  "than 0.25."]
    return "\n".join(lines) + "\n"


def cmd_judge_validate(args: argparse.Namespace) -> int:
    from kardia_rl.config.cli import config_source
    from kardia_rl.evaluation.human_data import load_human_items
    from kardia_rl.utils.io import atomic_write_text, write_json

    if args.probe_items < 1:
        raise KardiaError(f"--probe-items {args.probe_items}: must be at least 1")
    if args.min_gap < 0:
        raise KardiaError(f"--min-gap {args.min_gap}: must be >= 0")
    items = load_human_items(args.data, args.fmt, args.limit)  # bad data fails before Ray starts
    cfg = config_from_args(args)
    config, overrides = config_source(args)
    from kardia_rl.cluster.ray_cluster import init_ray

    init_ray(log_level=cfg.logging.engine_log_level)
    gaps = (0.0,) + ((args.min_gap,) if args.min_gap > 0 else ())
    doc = validate(cfg, items, min_gaps=gaps, probes=args.probes, probe_items=args.probe_items, seed=args.seed,
                   config_path=config, overrides=tuple(overrides))
    doc.update(data=args.data, format=args.fmt, limit=args.limit)
    md = render_report(doc)
    write_json(os.path.join(args.out, "validation.json"), doc)
    atomic_write_text(os.path.join(args.out, "report.md"), md)
    print(md)
    print(f"wrote {args.out}/report.md and validation.json")
    return 0


cmd_judge_validate.configure = configure
