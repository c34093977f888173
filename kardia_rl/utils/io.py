"""Atomic file output: write to a temporary file in the same directory, fsync, then rename.

A crash or a Ctrl-C mid-write never leaves a half-written output or checkpoint behind; readers see either
the old file or the complete new one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterable, Iterator


@contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(final: str) -> Iterator[str]:
    """Build a directory in a temporary sibling (yielded), then publish it at `final` in one rename.

    An existing `final` is moved aside first and deleted only after the new one is in place; on any error the
    temporary directory is removed and `final` is left as it was. Readers never see a half-written directory.
    """
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=parent)
    try:
        yield tmp
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(final)}-", dir=parent)
            os.replace(final, os.path.join(old, "x"))
        os.replace(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_jsonl(path: str, rows: Iterable[dict]) -> None:
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_json(path: str, obj) -> None:
    """Strict JSON (no NaN: a mean over nothing is null), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
