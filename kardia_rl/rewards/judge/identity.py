"""Which judge scored a run: the one description every report uses (train's run_dir/judge.json and report, eval's
metrics.json and report.md, the pipeline's report.json, judge-validate's report).

`judge_identity(cfg.judge)` gives backend, model, prompt hash, rubric version and, with `judge.calibration`, the head
file with its checksum, training sources, licence note and validation numbers (calibration.head_summary). It reads
the head file and so refuses a missing, damaged or incompatible head with one line naming judge.calibration: the
trainer and the evaluation call it before any actor starts, which is where a bad head is reported.
"""
from __future__ import annotations

import os
from typing import Optional

from kardia_rl.rewards.judge.calibration import ENCODERS, head_summary
from kardia_rl.utils.io import write_json

JUDGE_FILE = "judge.json"


def judge_identity(cfg_judge) -> dict:
    """{backend, model, prompt_hash, rubric_version, note | temperature + group_wise, calibration} of the
    configured judge (`cfg_judge`: the config's judge section)."""
    from kardia_rl.rewards.judge.rubric_prompt import RUBRIC_VERSION, rubric_version_hash

    backend = cfg_judge.backend
    calibration: Optional[dict] = None
    if backend == "embedding":
        from kardia_rl.rewards.judge.embedding import EMBEDDING_JUDGE_VERSION

        package, model, _ = ENCODERS["minilm"]
        out = {"backend": backend, "model": f"{model} ({package})", "prompt_hash": None,
               "rubric_version": EMBEDDING_JUDGE_VERSION,
               "note": "offline proxy: no prompt; scores from embedding similarities (rewards/judge/embedding.py)"
                       + ("; the calibration head's dimensions from a head fitted on human levels"
                          if cfg_judge.calibration else "")}
        if cfg_judge.calibration:
            calibration = head_summary(cfg_judge.calibration)
    else:
        # The hash RubricJudge puts in its cache keys, less the backend/model part: it changes exactly when the
        # rubric text or the prompt wording does (the undefended prompt of judge.defences=false is another text).
        prompt_hash = rubric_version_hash()
        if not cfg_judge.defences:  # judge.defences=false asks with another prompt: its text goes into the hash
            from kardia_rl.rewards.judge.base import JudgeRequest
            from kardia_rl.rewards.judge.rubric_prompt import build_undefended_messages

            probe = JudgeRequest("P", "S", (("user", "U"),), "R", "g")
            prompt_hash = rubric_version_hash(repr(build_undefended_messages(probe, "jN")))
        out = {"backend": backend, "model": cfg_judge.model, "prompt_hash": prompt_hash,
               "rubric_version": RUBRIC_VERSION, "temperature": cfg_judge.temperature,
               "max_tokens": cfg_judge.max_tokens, "group_wise": bool(cfg_judge.group_wise),
               "group_order": cfg_judge.group_order, "defences": bool(cfg_judge.defences)}
    out["calibration"] = calibration
    return out


def write_judge_identity(cfg, name: str = JUDGE_FILE) -> dict:
    """The judge identity of `cfg`, also written (atomically) to run_dir/judge.json; returned."""
    identity = judge_identity(cfg.judge)
    write_json(os.path.join(cfg.run_dir, name), identity)
    return identity


def judge_identity_line(identity: dict) -> str:
    """One Markdown line naming the judge (for report.md files)."""
    parts = [f"backend `{identity['backend']}`", f"model `{identity['model']}`",
             f"rubric version `{identity['rubric_version']}`"]
    if identity.get("prompt_hash"):
        parts.append(f"prompt hash `{identity['prompt_hash']}`")
    cal = identity.get("calibration")
    if cal:
        val = cal.get("validation") or {}
        held = "; ".join(f"{k}: {v}" for k, v in (val.get("headline") or {}).items())
        parts.append(f"calibration `{cal['file']}` (sha256 {cal['sha256'][:12]}, {', '.join(cal['dimensions'])}"
                     + (f"; held-out {held}" if held else "") + ")")
    else:
        parts.append("no calibration head")
    return "Judge: " + ", ".join(parts)
