"""Atomic checkpoints for resumable runs.

Layout: run_dir/checkpoints/step_000012/{driver.json, learner/...} and run_dir/checkpoints/latest (the name of
the newest complete checkpoint). A checkpoint is assembled in a temporary directory and renamed into place,
and `latest` is replaced atomically only afterwards, so a crash at any point leaves the previous checkpoint
usable and never a half-written one. driver.json holds everything outside the learner: step, prompt-stream
position, RNG states, monitor state.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Callable, Optional

from kardia_rl.utils.io import atomic_dir, atomic_write_text


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
    def __init__(self, run_dir: str, keep_last: int = 2):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:06d}")

    def save(self, step: int, driver_state: dict, save_learner: Callable[[str], None]) -> str:
        """Write driver state and let `save_learner(dir)` write the learner state, then publish atomically."""
        final = self.path(step)
        with atomic_dir(final) as tmp:
            save_learner(os.path.join(tmp, "learner"))
            atomic_write_text(os.path.join(tmp, "driver.json"), json.dumps({"step": step, **driver_state}))
        atomic_write_text(os.path.join(self.root, "latest"), os.path.basename(final))
        self._prune()
        return final

    def _prune(self) -> None:
        steps = sorted(d for d in os.listdir(self.root) if d.startswith("step_"))
        for d in steps[:-self.keep_last]:
            shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)

    def latest(self) -> Optional[str]:
        """Directory of the newest complete checkpoint, or None."""
        marker = os.path.join(self.root, "latest")
        if not os.path.exists(marker):
            return None
        path = os.path.join(self.root, open(marker).read().strip())
        return path if os.path.exists(os.path.join(path, "driver.json")) else None

    @staticmethod
    def load_driver_state(path: str) -> dict:
        with open(os.path.join(path, "driver.json")) as f:
            return json.load(f)
