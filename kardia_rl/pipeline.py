"""The main job (`kardia-rl pipeline CONFIG`): Kardia-R1 end to end.

data check -> base model (built locally when missing) -> difficulty split (resolution rates of a reference
policy) -> SFT on the easy samples -> GRPO on the hard samples (Ray: rollout group, judge pool, DeepSpeed
learner) -> evaluation of base vs SFT vs GRPO on the test split -> run report.

Every stage writes into run_dir and is skipped when its output is already complete, so re-running the same
command after an interruption continues where it stopped (GRPO resumes from its latest checkpoint).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace

from kardia_rl.cluster.learner_group import run_sft_on_group
from kardia_rl.cluster.sft_check import finish_format_check
from kardia_rl.config import KardiaConfig, to_dict
from kardia_rl.config.cli import add_config_args, config_from_args
from kardia_rl.curriculum.split import split_samples
from kardia_rl.data import TurnSample, label_set, validate
from kardia_rl.data.encoding import load_training_turns
from kardia_rl.data.sources import read_jsonl
from kardia_rl.errors import DataError, KardiaError
from kardia_rl.evaluation.harness import run_eval
from kardia_rl.model.prepare import ensure_prepared, prepared_record
from kardia_rl.monitoring.logger import read_metrics
from kardia_rl.plan import preflight
from kardia_rl.rewards.judge.identity import judge_identity
from kardia_rl.trainer.run import run_train
from kardia_rl.trainer.validation import BEST_DIR, read_best
from kardia_rl.utils.construction_log import STAGE_ENV
from kardia_rl.utils.io import atomic_write_text


def stage_data(cfg: KardiaConfig, state: dict) -> dict:
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


def stage_model(cfg: KardiaConfig, state: dict) -> dict:
    """Prepare model.path (hub id, folder or .gguf; builtin:tiny is built under run_dir): every later stage
    loads the prepared folder (run_pipeline puts it into model.path)."""
    path = ensure_prepared(cfg)
    rec = prepared_record(path) or {}
    print(f"[model] using {path}" + (f" (prepared from {rec['source']}, sha256 {rec['source_sha256'][:12]})"
                                    if rec else ""))
    return {"path": path, "source": cfg.model.path, "prepared": bool(rec),
            **({k: rec.get(k) for k in ("kind", "source_sha256", "architecture", "rows")} if rec else {})}


def stage_split(cfg: KardiaConfig, state: dict) -> dict:
    out_dir = os.path.join(cfg.run_dir, "split")
    done = os.path.join(out_dir, "split.json")
    if not os.path.exists(done):  # split.reference=warmup: K cross-fitted warm-ups (curriculum/crossfit.py)
        train, _ = load_training_turns(cfg)
        split_samples(cfg, train, None, out_dir, work_dir=os.path.join(cfg.run_dir, "reference_models"))
    with open(done) as f:
        meta = json.load(f)
    sizes = meta.get("sizes", {})
    how = meta.get("method") + (f", K={meta['folds']}" if meta.get("folds") else "")
    print(f"[split] easy (SFT) {sizes.get('easy')} / hard (GRPO) {sizes.get('hard')} samples ({how}); tau={cfg.split.tau}")
    for part in ("easy", "hard"):
        if not sizes.get(part):
            raise KardiaError(f"[split] the {part} split is empty (sizes {sizes}); adjust split.tau "
                              f"({cfg.split.tau}) or split.reward_threshold ({cfg.split.reward_threshold})")
    return {"dir": out_dir, "sizes": sizes, "method": meta.get("method"), "folds": meta.get("folds")}


def _read_samples(path: str) -> list:
    return [TurnSample.from_record(r) for r in read_jsonl(path)]


def stage_sft(cfg: KardiaConfig, state: dict) -> dict:
    out_dir = os.path.join(cfg.run_dir, "sft_model")
    val = load_training_turns(cfg)[1]
    if not os.path.exists(os.path.join(out_dir, "sft_result.json")):
        easy = _read_samples(os.path.join(state["split"]["dir"], "easy.jsonl"))
        # learner.num_workers Ray ranks with the ZeRO stage and placement of the GRPO learner group
        run_sft_on_group(cfg, out_dir, easy, val)
    # a run stopped after training but before the format check (rank 0 writes the result first) runs the check now
    res = finish_format_check(cfg, out_dir, val)
    keep = ("train_examples", "steps", "train_seconds", "val_loss_final", "format_valid_rate", "emotion_accuracy")
    print(f"[sft] format-valid {res.get('format_valid_rate')} on validation; model in {out_dir}")
    return {"path": out_dir, **{k: res.get(k) for k in keep}}


def stage_grpo(cfg: KardiaConfig, state: dict) -> dict:
    run_dir = os.path.join(cfg.run_dir, "grpo")
    policy = os.path.join(run_dir, "policy")
    if not os.path.exists(os.path.join(policy, "config.json")):
        gcfg = replace(cfg, run_dir=run_dir, model=replace(cfg.model, path=state["sft"]["path"]),
                       checkpoint=replace(cfg.checkpoint, resume=True),
                       algo=replace(cfg.algo, train_samples=os.path.join(state["split"]["dir"], "hard.jsonl")))
        run_train(gcfg)
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    first, last = rows[0], rows[-1]
    keys = ("rollout/reward_mean", "rollout/format_rate", "rollout/emotion_acc", "train/kl", "timing/step")
    best = read_best(os.path.join(run_dir, BEST_DIR))  # checkpoint.keep_best: chosen on the validation split
    return {"path": policy, "steps": len(rows), "first": {k: first.get(k) for k in keys},
            "last": {k: last.get(k) for k in keys},
            "val": [{k: v for k, v in r.items() if k == "step" or k.startswith("val/")} for r in rows
                    if "val/reward_mean" in r],
            "best_policy": os.path.join(run_dir, BEST_DIR) if best else None,
            "best": {k: best.get(k) for k in ("step", "val/reward_mean")} if best else None}


def stage_eval(cfg: KardiaConfig, state: dict) -> dict:
    out_dir = os.path.join(cfg.run_dir, "eval")
    metrics_file = os.path.join(out_dir, "metrics.json")
    # The GRPO row is best_policy when checkpoint.keep_best exported one (chosen on the validation split, never
    # on this test split), else the final policy; report.md's Models line and report.json say which.
    grpo = state["grpo"].get("best_policy") or state["grpo"]["path"]
    if not os.path.exists(metrics_file):
        models = [("base", cfg.model.path), ("sft", state["sft"]["path"]), ("grpo", grpo)]
        run_eval(cfg, models, "test", out_dir)
    with open(os.path.join(out_dir, "report.md")) as f:
        print(f.read())
    return {"dir": out_dir, "report": os.path.join(out_dir, "report.md"),
            "grpo_policy": "best_policy" if state["grpo"].get("best_policy") else "policy", "grpo_path": grpo}


STAGES = [("data", stage_data), ("model", stage_model), ("split", stage_split), ("sft", stage_sft),
          ("grpo", stage_grpo), ("eval", stage_eval)]
# Stages that start DeepSpeed, vLLM or Ray run in a fresh process each: in-process vLLM engines and DeepSpeed
# keep process-wide state (torch.distributed groups, thread settings, RNG) that the next stage must not inherit.
# The model stage loads whole models (preparation) and is isolated too, so the driver never holds their memory.
ISOLATED = {"model", "split", "sft", "grpo", "eval"}


def _child(fn, cfg, state, queue, name: str = "") -> None:
    os.environ[STAGE_ENV] = name  # the placement audit's stage tag; init_ray passes it on to this stage's actors
    try:
        queue.put(("ok", fn(cfg, state)))
    except KardiaError as e:
        queue.put(("user", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the pipeline
        import traceback

        traceback.print_exc()
        queue.put(("crash", f"{type(e).__name__}: {e}"))


def run_isolated(name: str, fn, cfg: KardiaConfig, state: dict) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, cfg, state, queue, name), name=f"kardia-{name}")
    proc.start()
    # SIGTERM to the pipeline (`ray job stop`, preemption) goes on to the stage, which checkpoints and stops.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, _: proc.is_alive() and os.kill(proc.pid, signum))
    status, payload = None, None
    try:
        while proc.is_alive() or not queue.empty():
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except Exception:  # queue.Empty: keep waiting while the stage runs
                continue
        proc.join()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if status == "ok":
        return payload
    if status == "user":
        raise KardiaError(payload)
    raise KardiaError(f"stage {name} failed ({payload or f'exit code {proc.exitcode}'}); see the output above. "
                      f"Re-run the same command to continue from this stage.")


def run_pipeline(cfg: KardiaConfig) -> int:
    plan = preflight(cfg, "pipeline")  # seconds, no GPU: exit 2 naming the problem before any stage starts
    os.makedirs(cfg.run_dir, exist_ok=True)
    # the judge that scores every stage (a bad judge.calibration head stops the pipeline here, before any stage)
    report = {"config": to_dict(cfg), "judge": judge_identity(cfg.judge), "plan_gib": plan.estimates, "stages": {}}
    state: dict = {}
    t_all = time.time()
    for name, fn in STAGES:
        t0 = time.time()
        print(f"[pipeline] stage {name}")
        state[name] = run_isolated(name, fn, cfg, state) if name in ISOLATED else fn(cfg, state)
        if name == "model":  # later stages (split, SFT, eval's base) load the prepared folder
            judge = cfg.judge
            if judge.model == cfg.model.path:  # the same model judging (the rehearsal's tiny judge): the same folder
                judge = replace(judge, model=state["model"]["path"])
            cfg = replace(cfg, model=replace(cfg.model, path=state["model"]["path"]), judge=judge)
        report["stages"][name] = {"result": state[name], "seconds": round(time.time() - t0, 2)}
        report["seconds"] = round(time.time() - t_all, 2)
        atomic_write_text(os.path.join(cfg.run_dir, "report.json"), json.dumps(report, indent=2, default=str))
    print(f"[pipeline] done in {report['seconds']:.0f} s; report: {os.path.join(cfg.run_dir, 'report.json')}")
    return 0


def cmd_pipeline(args) -> int:
    """`kardia-rl pipeline [CONFIG] [key=value ...]`."""
    return run_pipeline(config_from_args(args))


def _configure_pipeline(p) -> None:
    add_config_args(p)


cmd_pipeline.configure = _configure_pipeline
