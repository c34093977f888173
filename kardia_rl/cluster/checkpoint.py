"""Atomic checkpoints for resumable runs.

Layout: run_dir/checkpoints/step_000012/{driver.json, learner/..., manifest.json} and run_dir/checkpoints/latest
(the name of the newest published checkpoint, for people; resume does not trust it). A checkpoint is assembled in
a temporary directory and renamed into place, so a crash leaves the previous checkpoint usable and never a
half-written one; a kill during a save leaves a `.tmp-step_*` directory, which the next run's start-up removes.

manifest.json (written last) lists every file's size and checksum and records the verdict of the one verification
a checkpoint gets when it is written: each learner rank hashes its own share of the learner files, read back from
disk after the save (in parallel, in the learner actors), and the manager checks that the hashed files are exactly
the files on disk. Saving and pruning never hash a checkpoint again (pruning goes by name and a size check), so a
save costs one checkpoint's bytes of hashing however many are kept. Resume still verifies every checksum of what it
loads and falls back to the newest intact checkpoint when a later one was damaged after publication (a truncated
file, a full disk, a bad copy). driver.json holds everything outside the learner: step, prompt-stream position, RNG
states, monitor state.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
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


# Left in checkpoints/ by a process killed mid-write: atomic_dir's `.tmp-NAME-*` (a save in progress) and
# `.old-NAME-*` (a replaced checkpoint awaiting deletion), atomic_open's `.NAME.*.tmp` files.
_LEFTOVER = re.compile(r"^\.(tmp-|old-).+|^\..+\.tmp$")


class CheckpointManager:
    """Writes, verifies, lists and prunes the checkpoints of one run directory."""

    def __init__(self, run_dir: str, keep_last: int = 2):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:06d}")

    def remove_leftovers(self, log: Callable[[str], None] = print) -> list[str]:
        """Delete what interrupted saves left behind (call at start-up, before this run saves anything: a
        `.tmp-*` directory of a save still in progress would go too). Returns the names removed."""
        if not os.path.isdir(self.root):
            return []
        gone = []
        for name in sorted(os.listdir(self.root)):
            p = os.path.join(self.root, name)
            if not _LEFTOVER.match(name):
                continue
            size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(p) for n in ns) \
                if os.path.isdir(p) else os.path.getsize(p)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
            log(f"[checkpoint] removed {name} ({size / 2**20:.1f} MiB), left by an interrupted save")
            gone.append(name)
        return gone

    def save(self, step: int, driver_state: dict, save_learner: Callable[[str], Optional[dict]]) -> str:
        """Write the learner state (`save_learner(dir)`), driver state, then the manifest (last), then publish
        atomically. `save_learner` returns the {relative path: {size, blake2b}} of the files it wrote when its
        ranks hashed them (the learner group does); None means the files are hashed here."""
        final = self.path(step)
        with atomic_dir(final) as tmp:
            hashed = save_learner(os.path.join(tmp, "learner"))
            atomic_write_text(os.path.join(tmp, "driver.json"), json.dumps({"step": step, **driver_state}))
            write_manifest(tmp, step, {os.path.join("learner", rel): rec for rel, rec in (hashed or {}).items()},
                           by="learner ranks" if hashed is not None else "driver")
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
        """(path, problems) for every checkpoint, oldest first, every checksum verified; no problems = intact."""
        return [(p, verify_checkpoint(p)) for p in self.steps()]

    def _prune(self) -> None:
        """Keep the newest `keep_last` by name, and never delete the newest checkpoint whose recorded verdict
        still holds (manifest present, every file at its size: no hashing), even when newer ones are damaged."""
        found = self.steps()
        keep = set(found[-self.keep_last:]) if self.keep_last > 0 else set()
        for p in reversed(found):
            if not quick_problems(p):
                keep.add(p)
                break
        for p in found:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def latest(self, warn: Callable[[str], None] = _warn) -> Optional[str]:
        """The newest intact checkpoint (every checksum verified), or None when there is none at all. Damaged newer
        ones are reported through `warn` (which file, what is wrong) and skipped; if every checkpoint is damaged,
        KardiaError names them. Verifies newest first and stops at the first intact one."""
        found = self.steps()
        if not found:
            return None
        bad = []
        for path in reversed(found):
            problems = verify_checkpoint(path)
            if not problems:
                return path
            bad.append((path, problems))
            warn(f"checkpoint {path} is damaged ({'; '.join(problems[:3])}); trying an older one")
        raise KardiaError(f"no intact checkpoint in {self.root}: "
                          + "; ".join(f"{os.path.basename(p)}: {probs[0]}" for p, probs in reversed(bad))
                          + " (list them with `kardia-rl checkpoints RUN_DIR`; set checkpoint.resume=false to start over)")

    @staticmethod
    def load_driver_state(path: str) -> dict:
        with open(os.path.join(path, "driver.json")) as f:
            return json.load(f)


# --- manifest: every file's size and checksum, written last -------------------------------------------------
MANIFEST = "manifest.json"
_HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL on large blocks: threads hash in parallel


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


def hash_files(root: str, rels: list[str]) -> dict:
    """{rel: {size, blake2b}} of files under `root`, read back from disk (several files at once)."""
    def one(rel: str) -> tuple[str, dict]:
        p = os.path.join(root, rel)
        return rel, {"size": os.path.getsize(p), "blake2b": _digest(p)}

    with ThreadPoolExecutor(max(1, min(_HASH_THREADS, len(rels)))) as pool:
        return dict(pool.map(one, rels))


def rank_share(root: str, rank: int, world_size: int) -> list[str]:
    """The files under `root` that learner rank `rank` hashes: its own ZeRO shards (`*pp_rank_<rank>_*`), plus its
    part of the unowned files (rank 0's model states, DeepSpeed's `latest`), shared largest-first to the least-loaded
    rank. Every rank computes the same split from the same listing, so the shares cover every file exactly once."""
    load = [0] * world_size
    shares: list[list[str]] = [[] for _ in range(world_size)]
    rest = []
    for rel in _files(root):
        m = re.search(r"pp_rank_(\d+)_", os.path.basename(rel))
        owner = int(m.group(1)) if m else -1
        if 0 <= owner < world_size:
            shares[owner].append(rel)
            load[owner] += os.path.getsize(os.path.join(root, rel))
        else:
            rest.append(rel)
    for rel in sorted(rest, key=lambda r: (-os.path.getsize(os.path.join(root, r)), r)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        shares[r].append(rel)
        load[r] += os.path.getsize(os.path.join(root, rel))
    return shares[rank]


def write_manifest(ckpt_dir: str, step: int, hashed: Optional[dict] = None, by: str = "driver") -> dict:
    """Verify the checkpoint just written and record the verdict: every file's size and checksum (`hashed` holds
    what the learner ranks already hashed; the rest is hashed here), and a check that the hashed files are exactly
    the files on disk at their sizes. A mismatch raises (the save fails and its temporary directory goes)."""
    hashed = dict(hashed or {})
    on_disk = _files(ckpt_dir)
    strays = sorted(set(hashed) - set(on_disk))
    if strays:
        raise KardiaError(f"checkpoint {ckpt_dir}: {strays[0]} was hashed by the learner but is not on disk")
    mine = [rel for rel in on_disk if rel not in hashed]
    files = {**hashed, **hash_files(ckpt_dir, mine)}
    for rel in on_disk:
        size = os.path.getsize(os.path.join(ckpt_dir, rel))
        if size != files[rel]["size"]:
            raise KardiaError(f"checkpoint {ckpt_dir}: {rel} is {size} bytes on disk, hashed at {files[rel]['size']}")
    here = sum(files[rel]["size"] for rel in mine)
    verdict = {"intact": True, "files": len(files), "bytes": sum(f["size"] for f in files.values()),
               "hashed_bytes": {by: sum(f["size"] for f in hashed.values()), "driver": here} if hashed else {"driver": here}}
    record = {"format": 2, "step": step, "verified": verdict, "files": dict(sorted(files.items()))}
    atomic_write_text(os.path.join(ckpt_dir, MANIFEST), json.dumps(record, indent=1))
    return record


def _check(ckpt_dir: str, hash_them: bool) -> list[str]:
    mpath = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(mpath):
        return [f"no {MANIFEST} (partial, or written by a version without manifests)"]
    try:
        with open(mpath) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} unreadable: {e}"]
    problems: dict = {}
    for rel, want in files.items():
        p = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(p):
            problems[rel] = f"{rel}: missing"
        elif os.path.getsize(p) != want["size"]:
            problems[rel] = f"{rel}: {os.path.getsize(p)} bytes, manifest says {want['size']}"
    if hash_them:
        got = hash_files(ckpt_dir, [rel for rel in files if rel not in problems])
        problems.update({rel: f"{rel}: checksum differs from the manifest" for rel, rec in got.items()
                         if rec["blake2b"] != files[rel]["blake2b"]})
    return [problems[rel] for rel in files if rel in problems]


def quick_problems(ckpt_dir: str) -> list[str]:
    """The checks that need no hashing: a readable manifest and every listed file present at its size."""
    return _check(ckpt_dir, hash_them=False)


def verify_checkpoint(ckpt_dir: str) -> list[str]:
    """Problems found in one checkpoint directory (empty list = intact): a missing or unreadable manifest, and
    every listed file that is missing, has another size or another checksum."""
    return _check(ckpt_dir, hash_them=True)
