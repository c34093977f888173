"""`kardia-rl eval` and `kardia-rl judge-agreement` (commands of kardia_rl.cli's table).

    kardia-rl eval [CONFIG] --model DIR [--compare DIR2 ...] [--names a,b,c] [--data test|validation|train|PATH]
                   [--judge BACKEND] [--out DIR] [key=value ...]
    kardia-rl judge-agreement [CONFIG] --judges A B ... [--seeds 0 1 ...] --data D --responses FILE [--out DIR]

Each `cmd_x(args) -> int` carries `.configure` (its argparse set-up); CONFIG and the overrides follow the one
convention of kardia_rl.config.cli.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

from kardia_rl.config.cli import add_config_args, config_from_args, config_source, is_override
from kardia_rl.errors import KardiaError
from kardia_rl.config.schema import JUDGE_BACKENDS

GPU_JUDGES = ("vllm", "hf")  # judge backends that load a language model: served by a judge pool


def _positional(p: argparse.ArgumentParser) -> None:
    add_config_args(p, example="eval.max_samples=20")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------------ eval
def configure_eval(p: argparse.ArgumentParser) -> None:
    _positional(p)
    p.add_argument("--model", default=None, help="model/checkpoint directory (default: model.path)")
    p.add_argument("--compare", nargs="+", default=[], metavar="DIR",
                   help="more checkpoints evaluated into the same table (e.g. the SFT and GRPO models)")
    p.add_argument("--names", default="", help="comma-separated row names, one per model (default: folder names)")
    p.add_argument("--data", default="test", help="test | validation | train (splits of the config's data) or a "
                                                  "data path (default: test = data.test_path)")
    p.add_argument("--judge", choices=JUDGE_BACKENDS, default=None, help="judge backend (default: judge.backend)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval)")


def model_names(paths: list, names: str) -> list:
    """Row names: --names when given (one per model), else folder names made unique (-2, -3 ...)."""
    if names:
        out = [n.strip() for n in names.split(",")]
        if len(out) != len(paths) or not all(out):
            raise KardiaError(f"--names {names!r}: need {len(paths)} non-empty comma-separated names, one per model "
                              f"({', '.join(paths)})")
        return out
    out, seen = [], {}
    for p in paths:
        base = os.path.basename(os.path.normpath(p)) or p
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from kardia_rl.evaluation.harness import run_eval
    from kardia_rl.evaluation.report import main_table

    # `--compare A B x=y`: argparse gives x=y to --compare; it is an override, not a model
    compare = [c for c in args.compare if not is_override(c)]
    extra = [c for c in args.compare if is_override(c)]
    judge_override = [f"judge.backend={args.judge}"] if args.judge else []
    cfg = config_from_args(args, extra + judge_override)
    paths = [args.model or cfg.model.path] + compare
    models = list(zip(model_names(paths, args.names), paths))
    out = args.out or os.path.join(cfg.run_dir, "eval")
    doc = run_eval(cfg, models, args.data, out, progress=not args.no_progress)
    print()
    print(main_table(doc))
    print(f"\nwrote {out}/metrics.json, report.md, dimensions.png, emotion_accuracy.png, "
          + ", ".join(e["samples_file"] for e in doc["models"].values()))
    return 0


cmd_eval.configure = configure_eval


# ------------------------------------------------------------------------------------- judge agreement
def configure_judge_agreement(p: argparse.ArgumentParser) -> None:
    _positional(p)
    p.add_argument("--judges", nargs="+", required=True, metavar="SPEC",
                   help="judges to compare: BACKEND or BACKEND:key=value,... (judge config keys, and seed=N), "
                        "e.g. embedding vllm:model=/models/qwen3-8b,temperature=0.7")
    p.add_argument("--seeds", nargs="+", type=int, default=[], help="score with every judge under each of these seeds")
    p.add_argument("--data", required=True, help="KardiaBench data the responses answer (as for `kardia-rl score`)")
    p.add_argument("--responses", required=True, help='JSONL with one {"id": SAMPLE_ID, "completion": TEXT} per line')
    p.add_argument("--split", default=None, help="split of a DatasetDict source (default: data.hf_split)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/judge_agreement)")


def load_responses(cfg, data: str, responses: str, split=None) -> tuple:
    """(samples, completions) aligned, from KardiaBench data and a `kardia-rl score` responses file."""
    from kardia_rl.data import expand_turns, label_set, load_dialogues
    from kardia_rl.errors import DataError
    from kardia_rl.rewards.score_cli import read_responses

    dialogues = load_dialogues(data, label_set(cfg.data.emotion_labels or None), cfg.data.span_notation,
                               split or cfg.data.hf_split)
    by_id = {t.id: t for d in dialogues for t in expand_turns(d)}
    rows = read_responses(responses)
    unknown = [(n, sid) for n, sid, _ in rows if sid not in by_id]
    if unknown:
        shown = ", ".join(f"line {n}: {sid!r}" for n, sid in unknown[:5])
        raise DataError(f"{responses}: {len(unknown)} id(s) not found in {data} ({shown}); ids look like "
                        + ", ".join(repr(k) for k in list(by_id)[:3]))
    return [by_id[sid] for _, sid, _ in rows], [text for _, _, text in rows]


def cmd_judge_agreement(args: argparse.Namespace) -> int:
    from kardia_rl.evaluation.agreement import agreement_report, expand_judge_specs, score_with_judges
    from kardia_rl.config import load_config
    from kardia_rl.evaluation.report import render_agreement_markdown
    from kardia_rl.rewards import make_judge
    from kardia_rl.rewards.offline import close_judge
    from kardia_rl.utils.io import atomic_write_text, write_json

    config, overrides = config_source(args)
    cfg = load_config(config, overrides)
    specs = expand_judge_specs(args.judges, args.seeds, cfg.seed)
    samples, completions = load_responses(cfg, args.data, args.responses, args.split)
    breakdowns, meta = {}, {}
    for spec in specs:  # one judge at a time: LLM judges are released before the next one loads
        cfg_j = load_config(config, overrides + [f"judge.backend={spec.backend}"] + spec.overrides)
        if spec.backend in GPU_JUDGES:  # a GPU model: on a judge pool (judge.num_actors actors), never in here
            from kardia_rl.cluster.stage_pools import StagePools

            pools = StagePools(replace(cfg_j, seed=spec.seed), "judge-agreement")
            judge, close = pools.judge, pools.close
        else:  # the embedding proxy (CPU) or an HTTP judge (openai): nothing to place
            judge = make_judge(cfg_j.judge, seed=spec.seed)
            close = lambda judge=judge: close_judge(judge)  # noqa: E731
        try:
            breakdowns.update(score_with_judges({spec.name: cfg_j}, {spec.name: judge}, samples, completions,
                                                progress=not args.no_progress))
        finally:
            close()
        meta[spec.name] = {"backend": spec.backend, "seed": spec.seed, "overrides": spec.overrides,
                           "model": cfg_j.judge.model if spec.backend != "embedding" else "all-MiniLM-L6-v2 (proxy)"}
    rep = {"data": args.data, "responses": args.responses, "n_responses": len(completions),
           **agreement_report(breakdowns, meta)}
    out = args.out or os.path.join(cfg.run_dir, "judge_agreement")
    write_json(os.path.join(out, "agreement.json"), rep)
    md = render_agreement_markdown(rep)
    atomic_write_text(os.path.join(out, "agreement.md"), md)
    print(md)
    print(f"wrote {out}/agreement.json and agreement.md")
    return 0


cmd_judge_agreement.configure = configure_judge_agreement
