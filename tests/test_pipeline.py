"""The pipeline's skip/resume (pipeline.py): a stage whose output is complete is skipped on a re-run, a re-run after
a failed stage continues at that stage, and GRPO starts from the SFT model on the hard split with resume on.

The heavy work (model preparation, split, SFT, GRPO, eval) is replaced by writers of each stage's output files,
and the stages run in this process (ISOLATED emptied) so the replacements apply. No Ray, no model: seconds."""
from __future__ import annotations

import json
import os

import pytest

from kardia_rl import pipeline
from kardia_rl.config import load_config
from kardia_rl.errors import KardiaError
from kardia_rl.utils.io import atomic_write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeWork:
    """Stand-ins for each stage's heavy call; record what ran and with which settings."""

    def __init__(self, model_dir: str):
        self.model_dir, self.calls, self.fail, self.seen, self.best = model_dir, [], None, {}, False

    def _run(self, stage: str, **seen) -> None:
        self.calls.append(stage)
        self.seen[stage] = seen
        if self.fail == stage:
            raise KardiaError(f"{stage} interrupted (scripted)")

    def ensure_prepared(self, cfg):
        self._run("model")
        return self.model_dir

    def split_samples(self, cfg, samples, rates, out_dir, **kw):
        self._run("split", model=cfg.model.path, judge_model=cfg.judge.model)
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_jsonl(os.path.join(out_dir, "easy.jsonl"), [s.to_record() for s in samples[:3]])
        atomic_write_jsonl(os.path.join(out_dir, "hard.jsonl"), [s.to_record() for s in samples[3:5]])
        with open(os.path.join(out_dir, "split.json"), "w") as f:
            json.dump({"method": "scripted", "sizes": {"easy": 3, "hard": 2}}, f)

    def run_sft_on_group(self, cfg, out_dir, train, val, **kw):
        self._run("sft", n_train=len(train))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sft_result.json"), "w") as f:
            json.dump({"steps": 1, "format_valid_rate": 1.0}, f)

    def run_train(self, cfg):
        self._run("grpo", run_dir=cfg.run_dir, model=cfg.model.path, resume=cfg.checkpoint.resume,
                  train_samples=cfg.algo.train_samples)
        os.makedirs(os.path.join(cfg.run_dir, "policy"), exist_ok=True)
        with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1, "rollout/reward_mean": 0.5}) + "\n")
            if self.best:  # validation at step 2 kept its policy as best_policy (trainer/validation.py's layout)
                f.write(json.dumps({"step": 2, "rollout/reward_mean": 0.6, "val/reward_mean": 0.4}) + "\n")
        if self.best:
            write_best(os.path.join(cfg.run_dir, "best_policy"), step=2, reward=0.4)
        with open(os.path.join(cfg.run_dir, "policy", "config.json"), "w") as f:
            f.write("{}")

    def run_eval(self, cfg, models, data, out_dir, **kw):
        self._run("eval", models=list(models), data=data)
        os.makedirs(out_dir, exist_ok=True)
        for name, text in (("metrics.json", "{}"), ("report.md", "| model |\n")):
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(text)


def write_best(best_dir: str, step: int, reward: float, manifest: bool = True) -> None:
    from kardia_rl.cluster.checkpoint import write_manifest

    os.makedirs(best_dir, exist_ok=True)
    with open(os.path.join(best_dir, "config.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(best_dir, "best.json"), "w") as f:
        json.dump({"step": step, "num_steps": 2, "val_samples": 16, "greedy": True, "val/reward_mean": reward}, f)
    if manifest:
        write_manifest(best_dir, step)


@pytest.fixture
def work(tmp_path, monkeypatch):
    fake = FakeWork(str(tmp_path / "prepared-model"))
    monkeypatch.setattr(pipeline, "ISOLATED", set())
    # the pipeline's own names (it imports each stage's entry point at module level)
    monkeypatch.setattr(pipeline, "preflight", lambda cfg, mode: type("Plan", (), {"estimates": {}})())
    monkeypatch.setattr(pipeline, "ensure_prepared", fake.ensure_prepared)
    monkeypatch.setattr(pipeline, "prepared_record", lambda path: None)
    monkeypatch.setattr(pipeline, "split_samples", fake.split_samples)
    monkeypatch.setattr(pipeline, "run_sft_on_group", fake.run_sft_on_group)
    monkeypatch.setattr(pipeline, "finish_format_check", lambda cfg, out_dir, val: json.load(
        open(os.path.join(out_dir, "sft_result.json"))))
    monkeypatch.setattr(pipeline, "run_train", fake.run_train)
    monkeypatch.setattr(pipeline, "run_eval", fake.run_eval)
    return fake


def test_rerun_after_a_failed_stage_continues_there_and_a_finished_run_redoes_nothing(work, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [f"run_dir={run_dir}"])
    work.fail = "sft"
    with pytest.raises(KardiaError, match="sft interrupted"):
        pipeline.run_pipeline(cfg)
    assert work.calls == ["model", "split", "sft"]

    work.calls, work.fail = [], None
    assert pipeline.run_pipeline(cfg) == 0
    assert work.calls == ["model", "sft", "grpo", "eval"], "the split was complete: not redone"
    assert work.seen["sft"]["n_train"] == 3  # the easy part
    assert work.seen["grpo"] == {"run_dir": str(run_dir / "grpo"), "model": str(run_dir / "sft_model"),
                                 "resume": True, "train_samples": str(run_dir / "split" / "hard.jsonl")}
    assert work.seen["eval"] == {"models": [("base", work.model_dir), ("sft", str(run_dir / "sft_model")),
                                            ("grpo", str(run_dir / "grpo" / "policy"))], "data": "test"}
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["stages"]) == ["data", "model", "split", "sft", "grpo", "eval"]
    assert report["stages"]["grpo"]["result"]["steps"] == 1
    assert report["judge"]["backend"] == cfg.judge.backend and report["judge"]["calibration"] is None  # names its judge

    work.calls = []
    assert pipeline.run_pipeline(cfg) == 0
    assert work.calls == ["model"], "every later stage's output was complete"


def test_grpo_interrupted_before_its_policy_is_resumed_not_skipped(work, tmp_path):
    """Checkpoints without an exported policy mean GRPO did not finish: the stage runs again with resume on
    (the trainer then continues from its latest intact checkpoint)."""
    run_dir = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [f"run_dir={run_dir}"])
    work.fail = "grpo"
    with pytest.raises(KardiaError, match="grpo interrupted"):
        pipeline.run_pipeline(cfg)
    work.calls, work.fail = [], None
    pipeline.run_pipeline(cfg)
    assert work.calls == ["model", "grpo", "eval"] and work.seen["grpo"]["resume"] is True


def test_eval_scores_best_policy_when_grpo_kept_one_and_says_so(work, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [f"run_dir={run_dir}"])
    work.best = True
    pipeline.run_pipeline(cfg)
    best = str(run_dir / "grpo" / "best_policy")
    assert work.seen["eval"]["models"][2] == ("grpo", best)
    stages = json.loads((run_dir / "report.json").read_text())["stages"]
    assert stages["grpo"]["result"]["best_policy"] == best
    assert stages["grpo"]["result"]["best"] == {"step": 2, "val/reward_mean": 0.4}
    assert stages["grpo"]["result"]["val"] == [{"step": 2, "val/reward_mean": 0.4}]
    assert stages["eval"]["result"]["grpo_policy"] == "best_policy"

    # eval/report.md's "- Models:" line names the checkpoint of each row, and for best_policy the step it was kept for
    from kardia_rl.evaluation.harness import policy_selection
    from kardia_rl.evaluation.report import models_line

    doc = {"models": {"sft": {"model_path": "sft_model", "selection": policy_selection(str(run_dir / "sft_model"))},
                      "grpo": {"model_path": best, "selection": policy_selection(best)}}}
    assert models_line(doc) == (f"sft = `sft_model`; grpo = `{best}` (best_policy: GRPO step 2 of 2, best "
                                "val/reward_mean 0.400 on 16 validation prompts)")


def test_a_damaged_best_policy_is_not_scored(work, tmp_path, capsys):
    """A best_policy without an intact manifest (an export cut short) is not trusted: eval scores policy."""
    run_dir = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [f"run_dir={run_dir}"])
    write_best(str(run_dir / "grpo" / "best_policy"), step=2, reward=0.4, manifest=False)
    pipeline.run_pipeline(cfg)
    assert work.seen["eval"]["models"][2] == ("grpo", str(run_dir / "grpo" / "policy"))
    assert "best_policy is damaged" in capsys.readouterr().err


def test_a_judge_model_equal_to_model_path_follows_the_prepared_folder(work, tmp_path, monkeypatch):
    """conf/rehearsal.yaml's judge is its policy model (judge.model = model.path = builtin:tiny): after the model
    stage both name the prepared folder; a different judge model is left alone. And the placement audit writes one
    line per construction, actor null outside Ray (what tests/test_rehearsal.py looks for)."""
    from kardia_rl.engines import make_engine
    from kardia_rl.utils.construction_log import read_log

    run_dir = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [f"run_dir={run_dir}", "model.path=builtin:tiny",
                                                                "judge.model=builtin:tiny"])
    work.fail = "split"
    with pytest.raises(KardiaError):
        pipeline.run_pipeline(cfg)
    assert work.seen["split"] == {"model": work.model_dir, "judge_model": work.model_dir}
    with pytest.raises(KardiaError):
        pipeline.run_pipeline(load_config(os.path.join(ROOT, "conf", "tiny.yaml"),
                                          [f"run_dir={run_dir}", "judge.model=Qwen/Qwen3-8B"]))
    assert work.seen["split"]["judge_model"] == "Qwen/Qwen3-8B"

    monkeypatch.setenv("KARDIA_CONSTRUCTION_LOG", str(tmp_path / "audit"))
    monkeypatch.setenv("KARDIA_STAGE", "eval")
    with pytest.raises(KardiaError, match="not a model directory"):  # logged before the engine loads anything
        make_engine("hf", str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(Exception):  # an empty config: the engine fails to load, after its construction is logged
        make_engine("hf", str(tmp_path))
    assert read_log(str(tmp_path / "audit")) == [
        {"event": "construct", "kind": "engine:hf", "model": str(tmp_path), "pid": os.getpid(), "stage": "eval",
         "actor_id": None, "gpu_ids": None}]
