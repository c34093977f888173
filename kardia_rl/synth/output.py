"""Synthesis output: resumable shards, the filtered KardiaBench file, the summary.

Layout of OUT:
- shards/shard-NNNNN.jsonl: the raw results of synth.shard_size finished dialogues, one line each: the full
  record (contract in kardia_rl/synth/__init__.py) or `{"id": ..., "dropped": reason}` for a dialogue that
  ended without a record. Each shard is written to a temporary file, fsynced and renamed, so a shard either
  exists whole or not at all; shards are never rewritten (append-only). A restart reads every shard and
  skips the ids in them: a kill loses at most the dialogues of the shard being filled.
- kardiabench.jsonl: the filtered records (filters.apply_filters over ALL shards, so near-duplicates are
  found across shards and runs), rewritten atomically at the end of every run; it passes
  `kardia-rl validate-data` (a record that would not is dropped as `invalid_record`, a last guard).
- .embed_cache/part-NNNNN.npz: the user turns' MiniLM vectors (filters.EmbeddingCache), so that the filters
  of a resumed run encode only the new turns; derived data, safe to delete (it is rebuilt, same results).
- summary.json: counts, verdict frequencies (of the output and before the filters), drops by reason, role
  calls, start-up seconds (engines, clients) and dialogues/s of this run's synthesis (start-up excluded).
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from typing import Optional, Sequence

from kardia_rl.data.schema import verdict_rate
from kardia_rl.data.sources import read_jsonl
from kardia_rl.errors import DataError
from kardia_rl.utils.io import atomic_write_jsonl, atomic_write_text

SHARD_DIR = "shards"
OUTPUT_FILE = "kardiabench.jsonl"
SUMMARY_FILE = "summary.json"
EMBED_CACHE_DIR = ".embed_cache"


class ShardStore:
    """Finished dialogues of OUT/shards; `add` buffers, a full buffer becomes the next shard."""

    def __init__(self, out_dir: str, shard_size: int):
        self.dir = os.path.join(out_dir, SHARD_DIR)
        os.makedirs(self.dir, exist_ok=True)
        self.shard_size = shard_size
        self.results: list[dict] = []  # every finished result so far, shards first
        for path in sorted(glob.glob(os.path.join(self.dir, "shard-*.jsonl"))):
            try:
                self.results.extend(read_jsonl(path, "record"))
            except DataError as e:  # shards are renamed whole: this is outside damage
                raise DataError(f"{e}; the shard was changed after it was written; remove it to synthesise its "
                                "dialogues again") from None
        self.next_index = len(glob.glob(os.path.join(self.dir, "shard-*.jsonl")))
        self.done_ids = {r["id"] for r in self.results}
        self.resumed = len(self.results)
        self._buffer: list[dict] = []

    def add(self, rec_id: str, record: Optional[dict], drop: str) -> None:
        row = record if record is not None else {"id": rec_id, "dropped": drop}
        self._buffer.append(row)
        self.results.append(row)
        self.done_ids.add(rec_id)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        atomic_write_jsonl(os.path.join(self.dir, f"shard-{self.next_index:05d}.jsonl"), self._buffer)
        self.next_index += 1
        self._buffer = []


def finalize(out_dir: str, results: Sequence[dict], cfg, labels: Sequence[str],
             cache_dir: Optional[str] = None) -> tuple[list[dict], Counter]:
    """Filter every finished record, guard the output's validity, write kardiabench.jsonl; (kept, drops).
    `cache_dir` (the CLI passes OUT/EMBED_CACHE_DIR): the filters' embedding cache; None encodes every turn."""
    from kardia_rl.data import check_record
    from kardia_rl.synth.filters import DROP_REASONS, apply_filters

    drops = Counter(r["dropped"] for r in results if "dropped" in r)
    records = [r for r in results if "dropped" not in r]
    kept, filtered = apply_filters(records, cfg, cache_dir=cache_dir) if records else ([], {})
    drops.update({reason: 0 for reason in DROP_REASONS})  # every filter listed, also when it dropped nothing
    drops.update(filtered)
    valid = []
    for r in kept:
        if check_record(r, labels, cfg.data.span_notation):
            drops["invalid_record"] += 1
        else:
            valid.append(r)
    atomic_write_jsonl(os.path.join(out_dir, OUTPUT_FILE), valid)
    return valid, drops


def verdict_stats(records: Sequence[dict], tau: float) -> dict:
    """Verdict frequencies (all verdicts, and the final one per turn), revisions, and the easy/hard count that
    `kardia-rl split` will give this output: easy when 1 - p_FAIL >= split.tau (data.schema.verdict_rate)."""
    every, final, revisions, easy, turns = Counter(), Counter(), Counter(), 0, 0
    for r in records:
        for t in r["synth"]["turns"]:
            every.update(t["verdicts"])
            final[t["verdicts"][-1]] += 1
            revisions[t["revisions"]] += 1
            turns += 1
            easy += verdict_rate(t["verdicts"]) >= tau
    return {"turns": turns, "verdicts": dict(sorted(every.items())), "final_verdicts": dict(sorted(final.items())),
            "revisions_per_turn": {str(k): v for k, v in sorted(revisions.items())},
            "easy_turns": easy, "hard_turns": turns - easy,
            "dialogue_ends": dict(Counter(r["synth"]["end"] for r in records))}


def write_summary(out_dir: str, *, total: int, results: Sequence[dict], kept: Sequence[dict], drops: Counter,
                  resumed: int, new: int, seconds: float, startup: float, calls: dict, tau: float) -> dict:
    summary = {"dialogues_planned": total, "dialogues_finished": len(results), "resumed_from_shards": resumed,
               "synthesised_this_run": new, "kept": len(kept), "dropped": sum(drops.values()),
               "drops": dict(sorted(drops.items())), **verdict_stats(kept, tau),
               "before_filters": verdict_stats([r for r in results if "dropped" not in r], tau),
               "startup_s": round(startup, 3), "seconds_this_run": round(seconds, 3),
               "dialogues_per_s": round(new / seconds, 4) if seconds > 0 and new else 0.0,
               "role_calls_this_run": dict(calls), "output": os.path.join(out_dir, OUTPUT_FILE)}
    atomic_write_text(os.path.join(out_dir, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    return summary
