"""`kardia-rl split [CONFIG] [--data D] [--out DIR] [--model DIR] [key=value ...]`: the difficulty-aware split by
resolution rate, easy (SFT) and hard (GRPO) samples, from the command line."""
from __future__ import annotations

import argparse
import json
import os

from kardia_rl.config.cli import add_config_args, config_from_args


def configure_split(p: argparse.ArgumentParser) -> None:
    add_config_args(p, example="split.k=4")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--data", default=None, help="dialogues to split (default: data.path), split as given")
    p.add_argument("--out", default=None, help="output folder for easy.jsonl, hard.jsonl, split.json, rates.png "
                                               "(default: RUN_DIR/split)")
    p.add_argument("--model", default=None, help="reference policy sampled for resolution rates (default: split.reference: "
                                              "model.path, or K cross-fitted warm-ups in OUT/reference_models)")


def cmd_split(args: argparse.Namespace) -> int:
    from kardia_rl.curriculum.split import load_split_data, split_samples

    cfg = config_from_args(args)
    data = args.data or cfg.data.path
    samples, sources = load_split_data(cfg, data)
    out = args.out or os.path.join(cfg.run_dir, "split")
    doc = split_samples(cfg, samples, args.model, out, progress=not args.no_progress, sources=sources, data=data)
    shown = {k: doc[k] for k in ("method", "folds", "k", "reward_threshold", "temperature", "tau", "seed", "sizes", "rate_mean",
                                 "fields", "seconds") if k in doc}
    if "timing" in doc:
        shown["timing"] = {k: v for k, v in doc["timing"].items() if k != "judge_stats"}
    print(json.dumps(shown, indent=2))
    print("histogram: " + "  ".join(f"{h['lo']:.2f}{'' if h['lo'] == h['hi'] else '-' + format(h['hi'], '.2f')}: "
                                    f"{h['count']}" for h in doc["histogram"]))
    print(f"wrote {out}/easy.jsonl ({doc['sizes']['easy']}), hard.jsonl ({doc['sizes']['hard']}), split.json, rates.png")
    return 0


cmd_split.configure = configure_split
