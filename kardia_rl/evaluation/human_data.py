"""Human-labelled sets as a list of `HumanItem`s: what `kardia-rl judge-validate` (and `judge-calibrate`) read.

Real data is read from the path the user gives, never copied into the project. Formats (`load_human_items`):

- `epitome`: the folder with EPITOME's three CSVs (Sharma et al., EMNLP 2020), `emotional-reactions-reddit.csv`,
  `interpretations-reddit.csv`, `explorations-reddit.csv` (columns `sp_id, rp_id, seeker_post, response_post,
  level, rationales`). Rows are joined on (sp_id, rp_id); the three mechanism levels (0 none, 1 weak, 2 strong)
  are summed into `empathy` on 0-6. The mechanisms are NOT exposed as separate levels: they are facets of the
  one rubric dimension `empathy`, and a judge scores that dimension once (a per-mechanism row would compare one
  judge score with three partial labels). 61 rows of every file repeat an (sp_id, rp_id) pair (the same text,
  annotated again, sometimes differently): the k-th occurrence in each file is joined with the k-th in the
  others, and the item's level is the mean of its annotations' sums (so it can be x.5): 3,023 items. context_id = sp_id:
  102 seeker posts have 2-3 responses.
- `esconv`: one ESConv JSON-lines file, or a folder of them (train/valid/test.json; Liu et al., ACL 2021).
  The seeker rated the supporter once per conversation (`survey_score.seeker.empathy` / `relevance`, 1-5), so
  an item is one whole conversation: context = the situation and the seeker's turns, response = the
  supporter's turns in order, one per line (what the rating is about; a judge's prompt caps the response at
  2,000 characters and MiniLM reads its first 256 word pieces). Each conversation is its own context_id.
  Conversations without either rating are skipped (150 of 1,300).
- `jsonl` (a user's own data, graded): one JSON object per line,
  `{"context": str, "response": str, "levels": {DIMENSION: number, ...}, "context_id": str (optional)}`,
  DIMENSION one of the rubric dimensions below; context_id defaults to the context text itself, so replies to
  the same context are compared with each other.
- `pairs` (a user's own preferences): `{"context": str, "chosen": str, "rejected": str,
  "dimension": DIMENSION (optional, default empathy), "context_id": str (optional)}` per line; becomes two items
  of one context, levels 1 (chosen) and 0 (rejected); context_id defaults to the line, and --limit is
  rounded up to whole pairs.

`LABEL_MAP` is the one table of label -> rubric dimension; `LEVEL_SCALES` gives each source's human scale.
Bad input raises DataError naming the file, line and key (the CLI prints it and exits 2).
"""
from __future__ import annotations

import csv
import glob
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Optional

from kardia_rl.config.schema import RUBRIC_DIMENSIONS
from kardia_rl.errors import DataError
from kardia_rl.data.sources import iter_jsonl

HUMAN_FORMATS = ("epitome", "esconv", "pairs", "jsonl")
EPITOME_FILES = {"emotional_reactions": "emotional-reactions-reddit.csv",
                 "interpretations": "interpretations-reddit.csv",
                 "explorations": "explorations-reddit.csv"}
EPITOME_COLUMNS = ("sp_id", "rp_id", "seeker_post", "response_post", "level")

# Source label -> rubric dimension (how each set's human ratings are read as our dimensions).
LABEL_MAP: dict[str, dict[str, str]] = {
    "epitome": {"emotional_reactions + interpretations + explorations (summed)": "empathy"},
    "esconv": {"survey_score.seeker.empathy": "empathy", "survey_score.seeker.relevance": "relevance"},
    "jsonl": {d: d for d in RUBRIC_DIMENSIONS},
    "pairs": {"chosen > rejected (on `dimension`)": "<dimension>"},
}
# (source, dimension) -> (lowest, highest) human level; jsonl data uses the range it has (level_range()).
LEVEL_SCALES: dict[tuple[str, str], tuple[float, float]] = {
    ("epitome", "empathy"): (0.0, 6.0),
    ("esconv", "empathy"): (1.0, 5.0),
    ("esconv", "relevance"): (1.0, 5.0),
    ("pairs", "*"): (0.0, 1.0),
}


@dataclass(frozen=True)
class HumanItem:
    context_id: str           # items with the same context_id answer the same context (compared within it)
    context: str              # what the responder saw (seeker post / dialogue history as text)
    response: str
    levels: dict[str, float]  # rubric dimension -> human level
    source: str               # "epitome", "esconv", "jsonl", "pairs"


def load_human_items(path: str, fmt: str, limit: Optional[int] = None) -> list[HumanItem]:
    """The items of the set at `path` in format `fmt` (HUMAN_FORMATS); the first `limit` when given."""
    if fmt not in HUMAN_FORMATS:
        raise DataError(f"--format {fmt!r}: expected one of {', '.join(HUMAN_FORMATS)}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit}: must be at least 1")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder (human-labelled data for --format {fmt})")
    loader = {"epitome": _load_epitome, "esconv": _load_esconv, "jsonl": _load_jsonl, "pairs": _load_pairs}[fmt]
    items = loader(path, limit)
    if not items:
        raise DataError(f"{path}: no labelled items found for --format {fmt}")
    return items  # each loader stops at `limit` (pairs: at whole pairs, so possibly limit + 1 items)


def level_range(items: list[HumanItem], dim: str) -> tuple[float, float]:
    """The human scale of `dim`: the source's documented scale, else the lowest and highest level present."""
    src = items[0].source if items else ""
    if (src, dim) in LEVEL_SCALES:
        return LEVEL_SCALES[(src, dim)]
    if (src, "*") in LEVEL_SCALES:
        return LEVEL_SCALES[(src, "*")]
    vals = [it.levels[dim] for it in items if dim in it.levels]
    return (min(vals), max(vals)) if vals else (0.0, 0.0)


def dimensions_of(items: list[HumanItem]) -> list[str]:
    """The rubric dimensions the items carry human levels for, in rubric order."""
    present = {d for it in items for d in it.levels}
    return [d for d in RUBRIC_DIMENSIONS if d in present]


# --------------------------------------------------------------------------------------------- epitome
def _epitome_rows(path: str, name: str, fname: str) -> dict[tuple, list[tuple[int, dict]]]:
    fpath = os.path.join(path, fname)
    if not os.path.isfile(fpath):
        raise DataError(f"{fpath}: missing (an EPITOME folder holds {', '.join(EPITOME_FILES.values())})")
    out: dict[tuple, list] = defaultdict(list)
    with open(fpath, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in EPITOME_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{fpath}:1: missing column(s) {', '.join(missing)}")
        for row in reader:
            line = reader.line_num
            try:
                level = int(row["level"])
            except (TypeError, ValueError):
                raise DataError(f"{fpath}:{line}: level: {row['level']!r} is not 0, 1 or 2") from None
            if level not in (0, 1, 2):
                raise DataError(f"{fpath}:{line}: level: {level} is not 0, 1 or 2")
            out[(row["sp_id"], row["rp_id"])].append((line, {**row, "level": level}))
    return out


def _load_epitome(path: str, limit: Optional[int]) -> list[HumanItem]:
    if not os.path.isdir(path):
        raise DataError(f"{path}: --format epitome expects the folder holding {', '.join(EPITOME_FILES.values())}")
    tables = {name: _epitome_rows(path, name, fname) for name, fname in EPITOME_FILES.items()}
    first = next(iter(tables))
    items = []
    for key, rows in tables[first].items():
        sums = []
        for k, (line, row) in enumerate(rows):
            total = row["level"]
            for name in list(tables)[1:]:
                other = tables[name].get(key, [])
                if len(other) <= k:
                    raise DataError(f"{os.path.join(path, EPITOME_FILES[first])}:{line}: sp_id/rp_id: "
                                    f"{key[0]}/{key[1]} has no matching row in {EPITOME_FILES[name]}")
                total += other[k][1]["level"]
            sums.append(total)
        row = rows[0][1]
        items.append(HumanItem(context_id=key[0], context=row["seeker_post"], response=row["response_post"],
                               levels={"empathy": sum(sums) / len(sums)}, source="epitome"))
        if limit and len(items) >= limit:
            break
    return items


# ---------------------------------------------------------------------------------------------- esconv
def _esconv_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = [os.path.join(path, f"{s}.json") for s in ("train", "valid", "test")]
        files = [f for f in files if os.path.isfile(f)] or sorted(glob.glob(os.path.join(path, "*.json")))
        if not files:
            raise DataError(f"{path}: no ESConv .json files (train.json, valid.json, test.json)")
        return files
    return [path]


def _rating(fpath: str, n: int, survey: dict, key: str) -> Optional[float]:
    v = survey.get(key)
    if v in (None, ""):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise DataError(f"{fpath}:{n}: survey_score.seeker.{key}: {v!r} is not a 1-5 rating") from None
    if not 1 <= x <= 5:
        raise DataError(f"{fpath}:{n}: survey_score.seeker.{key}: {v!r} is not a 1-5 rating")
    return x


def _load_esconv(path: str, limit: Optional[int]) -> list[HumanItem]:
    items = []
    for fpath in _esconv_files(path):
        split = os.path.splitext(os.path.basename(fpath))[0]
        for n, conv in iter_jsonl(fpath):
            survey = (conv.get("survey_score") or {}).get("seeker") or {}
            if not isinstance(survey, dict):
                raise DataError(f"{fpath}:{n}: survey_score.seeker: expected an object")
            levels = {}
            for label, dim in (("empathy", "empathy"), ("relevance", "relevance")):
                x = _rating(fpath, n, survey, label)
                if x is not None:
                    levels[dim] = x
            if not levels:
                continue
            dialog = conv.get("dialog")
            if not isinstance(dialog, list) or not dialog:
                raise DataError(f"{fpath}:{n}: dialog: expected a non-empty list of turns")
            seeker, supporter = [], []
            for t, turn in enumerate(dialog):
                if not isinstance(turn, dict) or turn.get("speaker") not in ("usr", "sys") or \
                        not isinstance(turn.get("text"), str):
                    raise DataError(f"{fpath}:{n}: dialog[{t}]: expected {{text: str, speaker: usr|sys}}")
                (seeker if turn["speaker"] == "usr" else supporter).append(turn["text"].strip())
            if not supporter:
                raise DataError(f"{fpath}:{n}: dialog: no supporter (sys) turn to rate")
            situation = str(conv.get("situation") or "").strip()
            context = (f"{situation}\n" if situation else "") + "\n".join(seeker)
            items.append(HumanItem(context_id=f"{split}:{n}", context=context, response="\n".join(supporter),
                                   levels=levels, source="esconv"))
            if limit and len(items) >= limit:
                return items
    return items


# ------------------------------------------------------------------------------------------ user data
def _text(fpath: str, n: int, obj: dict, key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{fpath}:{n}: {key}: expected a non-empty string, got {v!r}"[:300])
    return v


def _dimension(fpath: str, n: int, key: str, name) -> str:
    if name not in RUBRIC_DIMENSIONS:
        raise DataError(f"{fpath}:{n}: {key}: {name!r} is not a rubric dimension ({', '.join(RUBRIC_DIMENSIONS)})")
    return name


def _load_jsonl(path: str, limit: Optional[int]) -> list[HumanItem]:
    items = []
    for n, obj in iter_jsonl(path):
        context, response = _text(path, n, obj, "context"), _text(path, n, obj, "response")
        levels = obj.get("levels")
        if not isinstance(levels, dict) or not levels:
            raise DataError(f"{path}:{n}: levels: expected an object {{dimension: number}}, got {levels!r}"[:300])
        out = {}
        for dim, v in levels.items():
            _dimension(path, n, f"levels.{dim}", dim)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise DataError(f"{path}:{n}: levels.{dim}: {v!r} is not a number")
            out[dim] = float(v)
        cid = obj.get("context_id", context)
        items.append(HumanItem(context_id=str(cid), context=context, response=response, levels=out, source="jsonl"))
        if limit and len(items) >= limit:
            break
    return items


def _load_pairs(path: str, limit: Optional[int]) -> list[HumanItem]:
    items = []
    for n, obj in iter_jsonl(path):
        context = _text(path, n, obj, "context")
        chosen, rejected = _text(path, n, obj, "chosen"), _text(path, n, obj, "rejected")
        dim = _dimension(path, n, "dimension", obj.get("dimension", "empathy"))
        cid = str(obj.get("context_id", f"line{n}"))
        items += [HumanItem(cid, context, chosen, {dim: 1.0}, "pairs"),
                  HumanItem(cid, context, rejected, {dim: 0.0}, "pairs")]
        if limit and len(items) >= limit:
            break
    return items
