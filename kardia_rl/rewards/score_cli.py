"""`kardia-rl score`: the unified reward of any model's outputs on KardiaBench data.

    kardia-rl score [CONFIG] --data builtin:sample/test --responses outputs.jsonl --judge embedding
                    [reward.format_mode=graded ...] [--out scores.json]

--data is KardiaBench data (any form `validate-data` accepts), expanded to per-turn samples in order;
--responses is a JSONL file with one {"id": <sample id>, "completion": <text>} per line ("response" is
accepted instead of "completion"). Sample ids look like "<dialogue id>/t<turn>" (the ids `expand_turns`
gives; see the --out JSON of a run or the error message for examples). Several lines may share an id:
they are candidates for the same sample and form one group (for the neutral judge fallback). Prints a
per-line table (id, format, emotion, rubric, total), the per-component and per-dimension means, and the
judge statistics; --out also writes everything as JSON (atomically).
"""
from __future__ import annotations

import argparse
import json
import math
import os

from kardia_rl.config.cli import add_config_args, config_from_args
from kardia_rl.config.schema import JUDGE_BACKENDS
from kardia_rl.data.sources import iter_jsonl
from kardia_rl.errors import DataError


def configure_score(p: argparse.ArgumentParser) -> None:
    add_config_args(p, example="reward.emotion_mode=soft")
    p.add_argument("--data", required=True, help="KardiaBench data: file, directory, HF name or builtin:sample[/test]")
    p.add_argument("--responses", required=True, help='JSONL with one {"id": SAMPLE_ID, "completion": TEXT} per line')
    p.add_argument("--judge", choices=JUDGE_BACKENDS, default=None, help="judge backend (default: the config's)")
    p.add_argument("--split", default=None, help="split of a DatasetDict source (default: data.hf_split)")
    p.add_argument("--out", default=None, help="write per-sample rows, summary and judge stats as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the summary, not the per-sample table")


def read_responses(path: str) -> list[tuple[int, str, str]]:
    """(line number, sample id, completion) per non-empty line; DataError names the file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: responses file not found")
    out = []
    for n, rec in iter_jsonl(path):
        if "id" not in rec:
            raise DataError(f"{path}:{n}: missing 'id' (the sample id, e.g. 'abc123def456/t0')")
        text = rec.get("completion", rec.get("response"))
        if text is None:
            raise DataError(f"{path}:{n}: missing 'completion' (or 'response') for id {rec['id']!r}")
        if not isinstance(text, str):
            raise DataError(f"{path}:{n}: 'completion' must be a string, got {type(text).__name__}")
        out.append((n, str(rec["id"]), text))
    if not out:
        raise DataError(f"{path}: no responses found")
    return out


def _json_safe(x):
    """NaN (a mean over no values) -> null, so --out is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _fmt(x: float) -> str:
    return "  nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def cmd_score(args: argparse.Namespace) -> int:
    from kardia_rl.data import expand_turns, label_set, load_dialogues
    from kardia_rl.rewards.unified import UnifiedReward, summary
    from kardia_rl.utils.io import atomic_write_text

    cfg = config_from_args(args, [f"judge.backend={args.judge}"] if args.judge else [])
    labels = label_set(cfg.data.emotion_labels)
    dialogues = load_dialogues(args.data, labels, cfg.data.span_notation, args.split or cfg.data.hf_split)
    samples = {t.id: t for d in dialogues for t in expand_turns(d)}
    rows = read_responses(args.responses)
    unknown = [(n, sid) for n, sid, _ in rows if sid not in samples]
    if unknown:
        shown = ", ".join(f"line {n}: {sid!r}" for n, sid in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        example = ", ".join(repr(k) for k in list(samples)[:3])
        raise DataError(f"{args.responses}: {len(unknown)} id(s) not found in {args.data} ({shown}{more}); "
                        f"ids look like {example}")
    reward = UnifiedReward.from_config(cfg)
    judge = reward.judge
    batch = [samples[sid] for _, sid, _ in rows]

    async def run():
        try:
            return await reward.score(batch, [t for _, _, t in rows], [sid for _, sid, _ in rows])
        finally:
            await judge.close()

    import asyncio

    breakdowns = asyncio.run(run())
    summ = summary(breakdowns)
    stats = reward.stats_summary()
    if not args.quiet:
        width = max(8, max(len(sid) for _, sid, _ in rows))
        print(f"{'id':<{width}}  format  emotion  rubric   total  note")
        for (_, sid, _), b in zip(rows, breakdowns):
            note = ("malformed" if b.parse_error else "") + (" judge-failed(fallback)" if b.fallback else "")
            print(f"{sid:<{width}}  {_fmt(b.format)}   {_fmt(b.emotion)}   {_fmt(b.rubric)}   {_fmt(b.total)}  "
                  f"{note.strip()}")
    print(f"\nscored {len(rows)} response(s) for {len(set(s for _, s, _ in rows))} of {len(samples)} samples "
          f"with judge={cfg.judge.backend}"
          + (" (an offline proxy, not an LLM judge)" if cfg.judge.backend == "embedding" else ""))
    for k, v in summ.items():
        print(f"  {k:<32} {_fmt(v) if isinstance(v, float) else v}")
    for k in ("judge/calls", "judge/failures", "judge/fallbacks", "judge/cache_hit_rate"):
        print(f"  {k:<32} {_fmt(stats[k]) if isinstance(stats[k], float) else stats[k]}")
    if args.out:
        doc = {"data": args.data, "responses": args.responses, "judge": cfg.judge.backend,
               "rows": [{"id": sid, "line": n, **b.as_dict()} for (n, sid, _), b in zip(rows, breakdowns)],
               "summary": summ, "stats": stats}
        atomic_write_text(args.out, json.dumps(_json_safe(doc), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        print(f"wrote {args.out}")
    return 0


cmd_score.configure = configure_score
