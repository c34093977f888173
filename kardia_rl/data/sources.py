"""Reading raw KardiaBench records from any supported source, each with the location users need in errors.

Sources: `.jsonl` (location = line), `.json` (a list of records or {"data": [...]}; location = the line
where each record starts), `.parquet`, a directory written by `datasets.save_to_disk` (location = row),
a Hugging Face hub dataset name (needs network; the hub is unreachable on the project's CI machines), and
`builtin:sample[/train|/test]` for the bundled sample. Yields `(line, record_or_None, error_or_None)` so
the validator can report *all* problems in one run instead of stopping at the first.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Iterator, Optional

from kardia_rl.errors import DataError

BUILTIN_PREFIX = "builtin:"


def builtin_path(name: str) -> str:
    """Resolve `builtin:sample`, `builtin:sample/train`, `builtin:sample/test` to bundled files."""
    spec = name[len(BUILTIN_PREFIX):]
    base = resources.files("kardia_rl") / "resources" / "sample_data"
    parts = {"sample": ["train.jsonl", "test.jsonl"], "sample/train": ["train.jsonl"], "sample/test": ["test.jsonl"]}
    if spec not in parts:
        raise DataError(f"{name}: unknown builtin dataset; choose one of "
                        + ", ".join(BUILTIN_PREFIX + k for k in parts))
    return ",".join(str(base / p) for p in parts[spec])


def resolve(path: str) -> list[str]:
    """Expand builtin names and comma-separated lists into concrete paths/names."""
    if path.startswith(BUILTIN_PREFIX):
        path = builtin_path(path)
    return [p for p in path.split(",") if p]


Row = tuple[int, Optional[dict], Optional[str]]


def _iter_jsonl(path: str) -> Iterator[Row]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line), None
            except json.JSONDecodeError as e:
                yield n, None, f"invalid JSON: {e.msg} (column {e.colno})"


def iter_jsonl(path: str, field: str = "", *, torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-empty line of a JSONL file (human labels, synthesis inputs, model outputs to
    score, per-turn sample files, run records, metrics), read by the same loop as the dialogue sources; invalid
    JSON or a line that is not a JSON object is a DataError naming PATH:LINE (and `field`, e.g. "record", when
    given). `torn_tail`: a bad LAST line is skipped instead (a writer killed mid-line, e.g. metrics.jsonl)."""
    where = f"{field}: " if field else ""
    bad = None  # the first bad line, raised once a line follows it (torn_tail) or at once
    for n, obj, problem in _iter_jsonl(path):
        if bad:
            raise DataError(bad)
        if problem is None and not isinstance(obj, dict):
            problem = f"expected a JSON object, got {type(obj).__name__}"
        if problem:
            bad = f"{path}:{n}: {where}{problem}"
            if not torn_tail:
                raise DataError(bad)
            continue
        yield n, obj


def read_jsonl(path: str, field: str = "") -> list[dict]:
    """Every object of a JSONL file, checked as iter_jsonl checks them (PATH:LINE on a bad line)."""
    return [obj for _, obj in iter_jsonl(path, field)]


def _iter_json(path: str) -> Iterator[Row]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    dec = json.JSONDecoder()
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        yield e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})"
        return
    if isinstance(top, dict) and isinstance(top.get("data"), list):
        items_at = text.index("[", text.index('"data"'))
    elif isinstance(top, list):
        items_at = text.index("[")
    else:
        yield 1, None, "expected a JSON list of records (or an object with a 'data' list)"
        return
    # Walk the array with raw_decode to learn the line on which each record starts.
    pos = items_at + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        obj, end = dec.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, obj, None
        pos = end


def _iter_dataset(ds) -> Iterator[Row]:
    for i, rec in enumerate(ds):
        yield i + 1, dict(rec), None


def _load_datasets_source(path: str, split: str):
    import datasets  # heavy import, only for these sources

    if os.path.isdir(path):
        obj = datasets.load_from_disk(path)
    elif path.endswith(".parquet"):
        obj = datasets.Dataset.from_parquet(path)
    else:
        try:
            obj = datasets.load_dataset(path, split=split)
        except Exception as e:  # the hub or a bad name: make it the user's error, not a traceback
            raise DataError(f"{path}: not a file or directory, and loading it as a Hugging Face dataset failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f"{path}: dataset has splits {sorted(obj)}, not {split!r}")
        obj = obj[split]
    return obj


def iter_rows(path: str, split: str = "train") -> Iterator[Row]:
    """Rows of one concrete source (no commas/builtins; see `resolve`)."""
    if path.endswith(".jsonl"):
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found")
        yield from _iter_jsonl(path)
    elif path.endswith(".json"):
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found")
        yield from _iter_json(path)
    elif path.endswith(".parquet") or os.path.isdir(path) or ("/" in path and not os.path.exists(path)):
        if path.endswith(".parquet") and not os.path.isfile(path):
            raise DataError(f"{path}: file not found")
        yield from _iter_dataset(_load_datasets_source(path, split))
    elif not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    else:
        raise DataError(f"{path}: unsupported data format; use .jsonl, .json, .parquet, a save_to_disk "
                        f"directory or a Hugging Face dataset name")
