"""The main job (`kardia-rl pipeline CONFIG`): every stage of Kardia-R1 that exists, in order.

data check -> base model (built locally when missing) -> ...later stages register below. Each stage
writes into `run_dir` and the run report (`run_dir/report.json`) records what each produced and how
long it took.
"""
from __future__ import annotations

import json
import os
import time

from kardia_rl.config import KardiaConfig, to_dict
from kardia_rl.utils.io import atomic_write_text


def stage_data(cfg: KardiaConfig) -> dict:
    from kardia_rl.data import label_set, validate
    from kardia_rl.errors import DataError

    out = {}
    for name, path in (("train", cfg.data.path), ("test", cfg.data.test_path)):
        if not path:
            continue
        rep = validate(path, label_set(cfg.data.emotion_labels), cfg.data.span_notation, cfg.data.hf_split)
        if rep.problems:
            raise DataError(f"{len(rep.problems)} problem(s) in {path}:\n" + "\n".join(rep.problems[:20]))
        out[name] = rep.summary()
        print(f"[data] {name}: {path}: {out[name]['dialogues']} dialogues, {out[name]['turns']} turns")
    return out


def stage_model(cfg: KardiaConfig) -> dict:
    from kardia_rl.model.tiny import build_tiny_model

    if os.path.isdir(cfg.model.path):
        print(f"[model] using {cfg.model.path}")
        return {"path": cfg.model.path, "built": False}
    if not cfg.model.init_size:
        return {"path": cfg.model.path, "built": False}  # a hub name: loaded by the stages that use it
    build_tiny_model(cfg.model.path, cfg.model.init_size, cfg.model.init_seed)
    print(f"[model] built {cfg.model.init_size} model in {cfg.model.path}")
    return {"path": cfg.model.path, "built": True}


STAGES = [("data", stage_data), ("model", stage_model)]


def run_pipeline(cfg: KardiaConfig) -> int:
    os.makedirs(cfg.run_dir, exist_ok=True)
    report = {"config": to_dict(cfg), "stages": {}}
    for name, fn in STAGES:
        t0 = time.time()
        result = fn(cfg)
        report["stages"][name] = {"result": result, "seconds": round(time.time() - t0, 2)}
        atomic_write_text(os.path.join(cfg.run_dir, "report.json"), json.dumps(report, indent=2))
    print(f"[pipeline] done; report: {os.path.join(cfg.run_dir, 'report.json')}")
    return 0
