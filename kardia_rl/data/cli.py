"""`kardia-rl validate-data PATH`: check KardiaBench data; exit 2 with PATH:LINE: field: message per problem."""
from __future__ import annotations

import argparse
import json
import sys

from kardia_rl.config.schema import SPAN_NOTATIONS


def cmd_validate_data(args: argparse.Namespace) -> int:
    from kardia_rl.data import label_set, validate

    labels = label_set(args.labels.split(",") if args.labels else None)
    rep = validate(args.path, labels, args.notation, args.split)
    if rep.problems:
        for line in rep.problems:
            print(line)
        print(f"{len(rep.problems)} problem(s) found in {args.path}", file=sys.stderr)
        return 2
    s = rep.summary()
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"{args.path}: OK: {s['dialogues']} dialogues, {s['turns']} turns, {s['profiles']} profiles, "
              f"{len(s['emotions'])} emotions")
        for emo, n in s["emotions"].items():
            print(f"  {emo:<14} {n}")
    return 0


def configure_validate_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="data file/dir/name (or builtin:sample)")
    p.add_argument("--labels", default="", help="comma-separated emotion label set (default: the 32)")
    p.add_argument("--notation", default="kardia", choices=SPAN_NOTATIONS)
    p.add_argument("--split", default="train", help="split of a DatasetDict source")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


cmd_validate_data.configure = configure_validate_data
