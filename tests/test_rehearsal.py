"""The cluster rehearsal: conf/rehearsal.yaml (cluster.yaml's topology, tiny model) end to end on a local Ray head
node that declares 8 GPUs while torch stays on CPU; and the `defaults:` composition it relies on.

The rehearsal (slow-marked, a few minutes on 2 busy cores): the pipeline's stages in cluster.yaml's order with 4
ZeRO-3 learner ranks (the split's 2 warm-ups, SFT and GRPO all on the learner group), 2 vLLM rollout actors fed by
the collective weight sync, a pool of 2 vLLM judge actors (cluster.yaml's judge backend, serving the tiny model),
each role in its placement group holding fake GPUs. The placement audit (KARDIA_CONSTRUCTION_LOG) then shows that
every engine and judge model was built inside a Ray actor holding GPU ids, none in the pipeline's or a stage's
process, and that the split, GRPO (rollouts and validation) and eval generated and judged on those actors. Then SFT
and GRPO again on ONE learner rank (ZeRO-3, world size 1) from the same split and base model. Tolerances (fp32): the
SFT exports agree within 1e-5 per weight (measured 1.8e-7), the GRPO rollouts are the same (equal rewards), and the
final GRPO policies agree within 1e-4 per weight (measured 3.7e-5, against 2.3e-3 of total movement): the 4-rank
and 1-rank gradient reductions differ in the last bits, and Adam's normalisation enlarges that on weights whose
gradients are near zero. Runtime about 8-10 minutes on 2 busy cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kardia_rl.config import load_config
from kardia_rl.utils.construction_log import read_log
from ray_head import start_head, stop_head
from kardia_rl.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REHEARSAL = os.path.join(ROOT, "conf", "rehearsal.yaml")
POLICY_TOL = 1e-4
SFT_TOL = 1e-5


def test_rehearsal_yaml_is_cluster_topology_with_tiny_settings():
    cfg, cluster = load_config(REHEARSAL), load_config(os.path.join(ROOT, "conf", "cluster.yaml"))
    for key in ("learner.num_workers", "learner.zero_stage", "learner.gpus_per_worker", "rollout.num_actors",
                "rollout.gpus_per_actor", "rollout.engine", "judge.num_actors", "judge.gpus_per_actor",
                "ray.placement_strategy", "split.reference", "split.folds", "learner.gradient_checkpointing"):
        sec, name = key.split(".")
        assert getattr(getattr(cfg, sec), name) == getattr(getattr(cluster, sec), name), key
    topology = (cfg.learner.num_workers, cfg.learner.zero_stage, cfg.rollout.num_actors, cfg.judge.num_actors)
    assert topology == (4, 3, 2, 2)
    assert cfg.model.path == "builtin:tiny" and cfg.data.path == "builtin:sample/train" and cfg.model.max_new_tokens == 128
    assert cfg.checkpoint.auto_resume == cluster.checkpoint.auto_resume  # unlisted keys are cluster.yaml's
    over = load_config(REHEARSAL, ["learner.num_workers=2"])  # key=value still wins over both files
    assert over.learner.num_workers == 2


def test_defaults_compose_in_order_and_name_bad_files(tmp_path):
    (tmp_path / "a.yaml").write_text("algo:\n  num_steps: 7\n  group_size: 4\nseed: 3\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\nalgo:\n  num_steps: 9\n")
    (tmp_path / "c.yaml").write_text("defaults: [b.yaml]\nseed: 5\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert (cfg.algo.num_steps, cfg.algo.group_size, cfg.seed) == (9, 4, 5)  # later files win, earlier ones fill in
    (tmp_path / "d.yaml").write_text("defaults: [missing.yaml]\n")
    with pytest.raises(ConfigError, match="d.yaml: defaults: .*missing.yaml: config file not found"):
        load_config(str(tmp_path / "d.yaml"))
    (tmp_path / "e.yaml").write_text("defaults: [f.yaml]\n")
    (tmp_path / "f.yaml").write_text("defaults: [e.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "e.yaml"))
    (tmp_path / "g.yaml").write_text("defaults: [a.yaml]\nalgo:\n  num_stepz: 1\n")
    with pytest.raises(ConfigError, match=r"g.yaml:3: algo.num_stepz: unknown key"):
        load_config(str(tmp_path / "g.yaml"))


@pytest.fixture
def fake_gpu_head():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    head = start_head(num_gpus=8)
    try:
        yield head["gcs"], head["env"]
    finally:
        stop_head(head["temp"])


def _weights(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def check_placement(log: list) -> None:
    """The placement rule, from the audit log: every engine and judge model built in a Ray actor holding GPU ids
    (none in the pipeline's or a stage's process), and each generating stage's calls served by those actors."""
    built = [r for r in log if r["event"] == "construct"]
    outside = [r for r in built if not r["actor_id"] or not r["gpu_ids"]]
    assert built and not outside, f"models built outside a GPU-holding Ray actor: {outside}"
    kinds = {(r["stage"], r["kind"]) for r in built}
    for stage in ("split", "grpo", "eval"):  # each stage's own pools: a vLLM rollout group and the vLLM judge pool
        assert {(stage, "engine:vllm"), (stage, "judge:vllm")} <= kinds, (stage, sorted(kinds))
    judges = [r for r in built if r["kind"] == "judge:vllm"]
    assert len({r["model"] for r in judges}) == 1  # judge.model=model.path: the model stage's folder for both
    # one judge pool per stage (2 actors), reused across the split's folds and eval's models
    for stage in ("split", "grpo", "eval"):
        assert sum(r["stage"] == stage for r in judges) == 2, stage
    calls = [r for r in log if r["event"] == "call"]
    assert calls and all(r["actor_id"] and r["gpu_ids"] for r in calls)
    for stage in ("split", "grpo", "eval"):
        mine = [r for r in calls if r["stage"] == stage]
        assert any(r["kind"] == "generate" for r in mine) and any(r["kind"] == "judge" for r in mine), stage
    # SFT's format check: greedy answers from a vLLM rollout group on the export (no judge: it counts the format)
    assert ("sft", "engine:vllm") in kinds and any(r["stage"] == "sft" and r["kind"] == "generate" for r in calls)
    grpo = [r for r in calls if r["stage"] == "grpo" and r["kind"] == "generate"]
    assert {r["n"] for r in grpo} == {1, 4}  # validation (one answer per held-out prompt) and rollouts (N = 4)


@pytest.mark.slow
@pytest.mark.ray
def test_cluster_rehearsal_on_fake_gpus(fake_gpu_head, sft_model_dir, tmp_path):
    from kardia_rl.data.sources import builtin_path

    address, env = fake_gpu_head
    run = tmp_path / "run"
    audit = tmp_path / "audit"
    env = dict(env, RAY_ADDRESS=address, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
               KARDIA_CONSTRUCTION_LOG=str(audit))
    cli = [sys.executable, "-m", "kardia_rl.cli"]
    # A smaller slice of the bundled data (24 training, 4 test dialogues) keeps the warm-ups' held-out validation and
    # the split's rating pass short. The policy starts from the short-SFT tiny model (as cluster.yaml starts from an
    # instruct model): a random-init model never writes the format, so the split would find no easy sample.
    data = {}
    for part, n in (("train", 24), ("test", 4)):
        lines = open(builtin_path(f"builtin:sample/{part}"), encoding="utf-8").read().splitlines()[:n]
        data[part] = tmp_path / f"{part}.jsonl"
        data[part].write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = run / "base_model"
    shutil.copytree(sft_model_dir, base)
    overrides = [f"run_dir={run}", f"model.path={base}", f"judge.model={base}", f"data.path={data['train']}",
                 f"data.test_path={data['test']}"]
    plan = subprocess.run(cli + ["plan", REHEARSAL, *overrides], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    # the plan asked the connected cluster: its 8 fake GPUs, all of them requested
    assert "): 8 GPUs" in plan.stdout and "= 8" in plan.stdout, plan.stdout
    out = subprocess.run(cli + ["pipeline", REHEARSAL, *overrides], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=1500)
    log = out.stdout[-6000:] + out.stderr[-6000:]
    assert out.returncode == 0, log
    report = json.loads((run / "report.json").read_text())
    assert list(report["stages"]) == ["data", "model", "split", "sft", "grpo", "eval"]
    sft = json.loads((run / "sft_model" / "sft_result.json").read_text())
    assert sft["world_size"] == 4
    for fold in (0, 1):  # the split's warm-ups ran on the 4-rank learner group too
        assert json.loads((run / "reference_models" / f"fold{fold}" / "sft_result.json").read_text())["world_size"] == 4
    metrics = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:  # weights reached both engines, verified against the learner's own forward
        assert m["rollout/sync_logprob_diff"] < 1e-3, m
    assert os.path.exists(run / "grpo" / "policy" / "model.safetensors")
    assert all("val/reward_mean" in m for m in metrics)  # algo.val_every=1: validated after every weight sync
    check_placement(read_log(str(audit)))

    # The same SFT and GRPO steps on ONE learner rank, from the same split and base model.
    ref = tmp_path / "ws1"
    ref.mkdir()
    shutil.copytree(run / "split", ref / "split")
    one = overrides[3:] + [f"run_dir={ref}", f"model.path={base}", f"judge.model={base}", "learner.num_workers=1",
                           "algo.val_every=0"]
    code = ("import sys, json; from kardia_rl.config import load_config; from kardia_rl import pipeline as P\n"
            "cfg = load_config(sys.argv[1], sys.argv[2:]); state = {'split': {'dir': cfg.run_dir + '/split'}}\n"
            "state['sft'] = P.run_isolated('sft', P.stage_sft, cfg, state)\n"
            "state['grpo'] = P.run_isolated('grpo', P.stage_grpo, cfg, state)\n")
    out1 = subprocess.run([sys.executable, "-c", code, REHEARSAL, *one], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert out1.returncode == 0, out1.stdout[-6000:] + out1.stderr[-6000:]
    assert json.loads((ref / "sft_model" / "sft_result.json").read_text())["world_size"] == 1
    def max_diff(x: dict, y: dict) -> float:
        assert sorted(x) == sorted(y)
        return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)

    assert max_diff(_weights(str(run / "sft_model")), _weights(str(ref / "sft_model"))) < SFT_TOL
    rewards = [[json.loads(line)["rollout/reward_mean"] for line in (d / "grpo" / "metrics.jsonl").open()]
               for d in (run, ref)]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-9)  # the same rollouts reached the learner
    a = _weights(str(run / "grpo" / "policy"))
    moved = max_diff(a, _weights(str(base)))
    assert moved > 10 * POLICY_TOL  # training really moved the weights, so the comparison means something
    assert max_diff(a, _weights(str(ref / "grpo" / "policy"))) < POLICY_TOL
