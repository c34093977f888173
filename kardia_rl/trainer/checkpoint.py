"""Atomic checkpoints for resumable runs.

Layout: run_dir/checkpoints/step_000012/{driver.json, learner/..., manifest.json} and run_dir/checkpoints/latest
(the name of the newest published checkpoint, for people; resume does not trust it). A checkpoint is assembled in
a temporary directory and renamed into place, so a crash leaves the previous checkpoint usable and never a
half-written one. manifest.json (written last) lists every file's size and checksum: resume verifies it and falls
back to the newest intact checkpoint when a later one was damaged after publication (a truncated file, a full disk,
a bad copy). driver.json holds everything outside the learner: step, prompt-stream position, RNG states, monitor
state.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from typing import Callable, Optional

from kardia_rl.errors import KardiaError
from kardia_rl.utils.io import atomic_dir, atomic_write_text


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def capture_rng() -> dict:
    import numpy as np
    import torch

    return {"python": repr(random.getstate()), "numpy": repr(np.random.get_state()[1].tolist()),
            "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state().tolist()}


def restore_rng(state: dict) -> None:
    import ast

    import numpy as np
    import torch

    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", np.array(ast.literal_eval(state["numpy"]), dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class CheckpointManager:
    """Writes, verifies, lists and prunes the checkpoints of one run directory."""

    def __init__(self, run_dir: str, keep_last: int = 2):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:06d}")

    def save(self, step: int, driver_state: dict, save_learner: Callable[[str], None]) -> str:
        """Write driver state and let `save_learner(dir)` write the learner state, then the manifest (last), then
        publish atomically."""
        final = self.path(step)
        with atomic_dir(final) as tmp:
            save_learner(os.path.join(tmp, "learner"))
            atomic_write_text(os.path.join(tmp, "driver.json"), json.dumps({"step": step, **driver_state}))
            write_manifest(tmp, step)
        atomic_write_text(os.path.join(self.root, "latest"), os.path.basename(final))
        self._prune()
        return final

    def steps(self) -> list[str]:
        """Checkpoint directories, oldest first (temporary and moved-aside directories excluded)."""
        if not os.path.isdir(self.root):
            return []
        return [os.path.join(self.root, d) for d in sorted(os.listdir(self.root))
                if d.startswith("step_") and os.path.isdir(os.path.join(self.root, d))]

    def status(self) -> list[tuple[str, list[str]]]:
        """(path, problems) for every checkpoint, oldest first; no problems means intact."""
        return [(p, verify_checkpoint(p)) for p in self.steps()]

    def _prune(self) -> None:
        """Keep the newest `keep_last`, and never delete the newest intact checkpoint (even when the newer ones
        are damaged)."""
        found = self.status()
        keep = {p for p, _ in found[-self.keep_last:]} if self.keep_last > 0 else set()
        intact = [p for p, problems in found if not problems]
        if intact:
            keep.add(intact[-1])
        for p, _ in found:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def latest(self, warn: Callable[[str], None] = _warn) -> Optional[str]:
        """The newest intact checkpoint, or None when there is none at all. Damaged newer ones are reported through
        `warn` (which file, what is wrong) and skipped; if every checkpoint is damaged, KardiaError names them."""
        found = self.status()
        if not found:
            return None
        for path, problems in reversed(found):
            if not problems:
                return path
            warn(f"checkpoint {path} is damaged ({'; '.join(problems[:3])}); trying an older one")
        raise KardiaError(f"no intact checkpoint in {self.root}: "
                          + "; ".join(f"{os.path.basename(p)}: {probs[0]}" for p, probs in found)
                          + " (list them with `kardia-rl checkpoints RUN_DIR`; set checkpoint.resume=false to start over)")

    @staticmethod
    def load_driver_state(path: str) -> dict:
        with open(os.path.join(path, "driver.json")) as f:
            return json.load(f)


# --- manifest: every file's size and checksum, written last -------------------------------------------------
MANIFEST = "manifest.json"


def _digest(path: str) -> str:
    # blake2b: a cryptographic-strength checksum at about twice sha256's speed (matters for 7B ZeRO shards).
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def _files(ckpt_dir: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(ckpt_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), ckpt_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(ckpt_dir: str, step: int) -> None:
    files = {rel: {"size": os.path.getsize(os.path.join(ckpt_dir, rel)), "blake2b": _digest(os.path.join(ckpt_dir, rel))}
             for rel in _files(ckpt_dir)}
    atomic_write_text(os.path.join(ckpt_dir, MANIFEST), json.dumps({"format": 1, "step": step, "files": files}, indent=1))


def verify_checkpoint(ckpt_dir: str) -> list[str]:
    """Problems found in one checkpoint directory (empty list = intact): a missing or unreadable manifest, and
    every listed file that is missing, has another size or another checksum."""
    mpath = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(mpath):
        return [f"no {MANIFEST} (partial, or written by a version without manifests)"]
    try:
        with open(mpath) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} unreadable: {e}"]
    problems = []
    for rel, want in files.items():
        p = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(p):
            problems.append(f"{rel}: missing")
        elif os.path.getsize(p) != want["size"]:
            problems.append(f"{rel}: {os.path.getsize(p)} bytes, manifest says {want['size']}")
        elif _digest(p) != want["blake2b"]:
            problems.append(f"{rel}: checksum differs from the manifest")
    return problems
