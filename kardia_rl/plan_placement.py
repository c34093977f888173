"""The plan's placement section: which Ray actors hold which GPUs in each stage, the checks that keep every GPU
model inside a GPU-holding Ray actor with a GPU of its own, and SFT validation's share of SFT compute.

One placement rule for the whole pipeline: a stage that generates does it on the rollout group
(rollout.num_actors actors x rollout.gpus_per_actor), a stage that judges on the judge pool (judge.num_actors x
judge.gpus_per_actor), a stage that trains on the learner group (learner.num_workers ranks x
learner.gpus_per_worker). A stage's pools run at the same time and are released before the next stage starts,
so a stage needs the sum of its own pools' GPUs, never the whole pipeline's.
"""
from __future__ import annotations

from dataclasses import dataclass

GPU_ENGINES = ("vllm", "hf")  # rollout engines / judge backends that put a model on a GPU when one is given
GPU_JUDGES = ("vllm", "hf")


@dataclass(frozen=True)
class Pool:
    role: str     # what the actors are, for the printed line
    count: int    # actors (ranks)
    gpus: float   # GPUs each actor holds in Ray
    key: str      # the keys that set it
    gpu_model: bool  # it runs a model that uses a GPU when it can see one (an engine, a judge LLM, a learner)
    engine: bool  # a vLLM/transformers engine (one engine per GPU: vLLM sizes itself from the whole GPU)

    @property
    def total(self) -> float:
        return self.count * self.gpus


def stage_pools(cfg, mode: str) -> list[tuple[str, list[Pool]]]:
    """Every stage `mode` runs (pipeline: all; train: GRPO), with the pools it holds at once, in run order."""
    lc, rc, jc, sc = cfg.learner, cfg.rollout, cfg.judge, cfg.synth
    learner = Pool("learner ranks", lc.num_workers, lc.gpus_per_worker,
                   "learner.num_workers x learner.gpus_per_worker", True, False)
    rollout = Pool(f"rollout actors ({rc.engine})", rc.num_actors, rc.gpus_per_actor,
                   "rollout.num_actors x rollout.gpus_per_actor", rc.engine in GPU_ENGINES, rc.engine in GPU_ENGINES)
    judged = [] if jc.backend == "openai" else [  # openai: an endpoint outside the cluster, no pool
        Pool(f"judge actors ({jc.backend})", jc.num_actors, jc.gpus_per_actor, "judge.num_actors x judge.gpus_per_actor",
             jc.backend in GPU_JUDGES, jc.backend in GPU_JUDGES)]
    grpo = "GRPO" + (" + validation" if cfg.algo.val_every > 0 else "")
    stages: list[tuple[str, list[Pool]]] = []
    if mode == "pipeline":
        if cfg.split.reference == "warmup":
            stages.append(("split warm-up SFT", [learner]))
        stages += [("split rating", [rollout, *judged]), ("SFT", [learner]), ("SFT format check", [rollout])]
    stages.append((grpo, [learner, rollout, *judged]))
    if mode == "pipeline":
        stages.append(("eval", [rollout, *judged]))
    if sc.pool == "ray":  # `kardia-rl synth`, a job of its own: shown when its roles run on the pools
        synth = [Pool(f"synthesis engine actors ({rc.engine})", sc.num_engines, rc.gpus_per_actor,
                      "synth.num_engines x rollout.gpus_per_actor", rc.engine in GPU_ENGINES, rc.engine in GPU_ENGINES)]
        if sc.evaluator_backend == "judge":
            synth += judged
        stages.append(("synthesis", synth))
    return stages


def _gpus(x: float) -> str:
    return f"{x:g} GPU" + ("" if x == 1 else "s")


def check_placement(cfg, plan, mode: str) -> None:
    """Print each stage's placement; add a problem (naming the stage and keys) for a stage that asks for more GPUs
    than the cluster has, a GPU model outside Ray's GPU accounting, or two engines (or ranks) on one GPU."""
    gpus = plan.cluster.gpus
    stages = stage_pools(cfg, mode)
    failing: list[set] = []
    for stage, pools in sorted(stages, key=lambda s: -sum(p.total for p in s[1])):
        total = sum(p.total for p in pools)
        if total > gpus and not any(set(pools) <= f for f in failing):  # a stage inside a failing one says nothing new
            failing.append(set(pools))
            plan.problems.append(f"{stage}: " + " + ".join(f"{p.key} = {p.total:g}" for p in pools) +
                                 f": {total:g} GPUs requested at once, the cluster ({plan.cluster.source}) has {gpus:g}")
    for stage, pools in stages:
        parts = [f"{p.role} {p.count} x " + (_gpus(p.gpus) if p.gpus else "CPU") for p in pools]
        plan.say(f"placement {stage}: " + " + ".join(parts) + f" = {_gpus(sum(p.total for p in pools))} of {gpus:g}")
    uses: dict[Pool, list[str]] = {}
    for stage, pools in stages:
        for p in pools:
            uses.setdefault(p, []).append(stage)
    seen = set()
    for p, where in uses.items():
        key = p.key.split(" x ")[1]
        if key in seen:
            continue
        seen.add(key)
        named = f"{key}={p.gpus:g} ({', '.join(where)})"
        if p.gpu_model and gpus > 0 and p.gpus == 0:
            plan.problems.append(f"{named}: the {p.role} would run a GPU-capable model in actors that hold no GPU in "
                                 f"Ray's accounting, on a cluster with {gpus:g} GPUs (it would see GPUs other actors "
                                 f"hold, or none): set {key} to 1 or more")
        elif p.gpus > 0 and p.gpus != int(p.gpus) and (p.engine or p.role == "learner ranks"):
            what = "two engines on one GPU (vLLM sizes its memory from the whole GPU)" if p.engine else \
                "two learner ranks on one GPU (NCCL refuses two ranks per device)"
            plan.problems.append(f"{named}: a fractional GPU share puts {what}: use a whole number (N >= 1: "
                                 + ("tensor parallel over N GPUs)" if p.engine else "one GPU per rank)"))


def sft_validation_share(cfg) -> dict:
    """SFT validation compute as a share of SFT training compute (docs/cluster.md states the formula).

    A forward pass costs ~2 P FLOPs per token, a training step ~6 P (forward + backward), both over sequences of
    the same length distribution (training and validation turns come from one dataset), so per eval_every steps:
        share = n_val x 2 / (eval_every x batch_size x 6) = n_val / (3 x batch_size x eval_every)
    with n_val = sft.max_val_samples. Once per run come the initial loss and the format check (a greedy answer per
    turn, at most one forward over each sequence): 2 x n_val x 2 P L = the compute of 2 n_val / (3 batch_size)
    training steps. Gradient checkpointing adds a forward to each training step, so the share is an upper bound.
    """
    s = cfg.sft
    n = s.max_val_samples
    out = {"n_val": n, "eval_every": s.eval_every, "batch_size": s.batch_size}
    if n <= 0:
        return out | {"share": None, "once_steps": None}
    share = n / (3 * s.batch_size * s.eval_every) if s.eval_every > 0 else 0.0
    return out | {"share": share, "once_steps": 2 * n / (3 * s.batch_size)}


def report_sft_validation(cfg, plan) -> None:
    v = plan.estimates["sft_validation"] = sft_validation_share(cfg)
    if v["share"] is None:
        plan.warnings.append("sft.max_val_samples=0: SFT scores every validation turn at each sft.eval_every; set a "
                             "cap (e.g. 256) to bound validation compute")
        return
    plan.say(f"SFT validation: sft.max_val_samples={v['n_val']} turns every sft.eval_every={v['eval_every']} steps of "
             f"sft.batch_size={v['batch_size']} = {100 * v['share']:.1f}% of SFT training compute "
             f"(n_val / (3 x batch_size x eval_every)), plus once the initial loss and the format check "
             f"(~{v['once_steps']:.1f} training steps)")
    if v["share"] > 0.10:
        plan.warnings.append(f"SFT validation costs {100 * v['share']:.0f}% of SFT training compute: lower "
                             "sft.max_val_samples or raise sft.eval_every")
