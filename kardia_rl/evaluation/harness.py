"""The evaluation harness: one answer per test sample from each model, scored by the unified reward.

    run_eval(cfg, [(name, model_dir), ...], data="test", out_dir=...) -> metrics document

Placement (cluster/stage_pools.py): nothing is loaded in this process but tokenizers. Per model: start a
rollout group on it (rollout.num_actors Ray actors with cfg.rollout.engine; a model named twice in a row
reuses it), encode every prompt with the SFT/GRPO prompt encoder (data.encoding.encode_prompt, so the model
sees exactly the prompts it was trained on), generate ONE answer per sample (greedy unless cfg.eval.greedy is
false) while the judge pool scores each chunk as it arrives, and write samples_<name>.jsonl; the group is shut
down before the next model's starts. The numbers come from rewards.answer_metrics.recompute_metrics over
those very rows, and report.py writes metrics.json, report.md and the plots after every model (partial
results survive a crash).

One judge pool scores every model (each actor's cache is content-keyed); the reward's counters are reset per
model. Both pools are released before run_eval returns.
"""
from __future__ import annotations

import os
import re
import time
from typing import Optional, Sequence

from kardia_rl.data import TurnSample, expand_turns, label_set, load_dialogues, split_dialogues
from kardia_rl.data.splits import select_subset  # the eval subset (also GRPO's validation prompts)
from kardia_rl.errors import KardiaError
from kardia_rl.rewards.answer_metrics import recompute_metrics, sample_row
from kardia_rl.rewards.offline import score_chunked

SPLITS = ("test", "validation", "train")


# --------------------------------------------------------------------------------------------- data
def load_eval_samples(cfg, data: str) -> tuple[list[TurnSample], str]:
    """Per-turn samples of `data` (test | validation | train | a data path) and where they came from.

    test = cfg.data.test_path, or the test part carved from cfg.data.path when test_path is empty;
    validation/train = the parts of cfg.data.path under cfg.data's split settings (as SFT uses them).
    """
    labels = label_set(cfg.data.emotion_labels or None)
    if data not in SPLITS:
        dialogues = load_dialogues(data, labels, cfg.data.span_notation, cfg.data.hf_split)
        source = data
    elif data == "test" and cfg.data.test_path:
        dialogues = load_dialogues(cfg.data.test_path, labels, cfg.data.span_notation, cfg.data.hf_split)
        source = cfg.data.test_path
    else:
        test_fraction = 0.0 if cfg.data.test_path else cfg.data.test_fraction
        parts = split_dialogues(load_dialogues(cfg.data.path, labels, cfg.data.span_notation, cfg.data.hf_split),
                                cfg.data.val_fraction, test_fraction, cfg.data.split_seed, cfg.data.split_by)
        dialogues = parts[data]
        source = f"{cfg.data.path} [{data} split]"
        if not dialogues:
            raise KardiaError(f"--data {data}: the {data} split of {cfg.data.path} is empty (data.val_fraction="
                              f"{cfg.data.val_fraction}, data.test_fraction={cfg.data.test_fraction}, data.test_path="
                              f"{cfg.data.test_path!r})")
    samples = [s for d in dialogues for s in expand_turns(d)]
    if not samples:
        raise KardiaError(f"{source}: no assistant turns to evaluate")
    return samples, source


def score_rows(cfg, name: str, samples: Sequence[TurnSample], prompt_texts: Sequence[str], completions: Sequence,
               reward, *, progress: bool = True) -> list[dict]:
    """Score one answer per sample (engine Completions) and build the sample rows."""
    breakdowns = score_chunked(reward, list(samples), [c.text for c in completions], [s.id for s in samples],
                               progress=progress, desc=f"judge [{name}]")
    return build_rows(cfg, name, samples, prompt_texts, completions, breakdowns)


def build_rows(cfg, name: str, samples: Sequence[TurnSample], prompt_texts: Sequence[str], completions: Sequence,
               breakdowns: Sequence) -> list[dict]:
    """The sample rows of one model's scored answers (one per sample)."""
    labels = label_set(cfg.data.emotion_labels or None)
    return [sample_row(s, p, c, b, name, cfg.data.span_notation, labels)
            for s, p, c, b in zip(samples, prompt_texts, completions, breakdowns)]


# ------------------------------------------------------------------------------------------ driver
def evaluate_model(cfg, name: str, model_path: str, samples: Sequence[TurnSample], reward, pools, *,
                   progress: bool = True) -> tuple[list[dict], dict]:
    """(sample rows, timing/throughput info) for one checkpoint: answered on `pools`' rollout group for it,
    scored by `reward` (on the judge pool) chunk by chunk."""
    from kardia_rl.cluster.stage_pools import generate_scored, load_tokenizer
    from kardia_rl.data.encoding import encode_prompt

    tokenizer = load_tokenizer(model_path)
    prompts = [encode_prompt(s, tokenizer, cfg) for s in samples]
    prompt_texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    t0 = time.perf_counter()
    group = pools.rollout(model_path)
    startup = time.perf_counter() - t0
    reward.reset_stats()
    # the group stays up: the next model reuses it when it is the same checkpoint, else replaces it (StagePools)
    res = generate_scored(group, reward, list(samples), prompts, n=1, seed=cfg.seed,
                          sampling={"greedy": cfg.eval.greedy, "temperature": cfg.eval.temperature},
                          progress=progress, desc=f"eval [{name}]")
    rows = build_rows(cfg, name, samples, prompt_texts, res.completions, res.rewards)
    gen_s, score_s = res.timing["timing/generation"], res.timing["timing/judge"]
    tokens = sum(len(c.token_ids) for c in res.completions)
    info = {"engine": cfg.rollout.engine, "rollout_actors": len(group.actors), "judge_actors": cfg.judge.num_actors,
            "engine_startup_s": round(startup, 3), "generation_s": round(gen_s, 3),
            "generated_tokens": tokens, "tokens_per_s": round(tokens / gen_s, 1) if gen_s > 0 else None,
            "samples_per_s": round(len(samples) / gen_s, 2) if gen_s > 0 else None, "scoring_s": round(score_s, 3),
            "judge_stats": reward.stats_summary()}
    return rows, info


def policy_selection(model_path: str):
    """For a GRPO best_policy export (checkpoint.keep_best): the step and validation numbers it was chosen on."""
    from kardia_rl.trainer.validation import BEST_RECORD, read_best

    best = read_best(model_path) if os.path.isfile(os.path.join(model_path, BEST_RECORD)) else None
    return None if best is None else {"policy": "best_policy", "step": best["step"], "num_steps": best.get("num_steps"),
                                      "val_reward_mean": best["val/reward_mean"], "val_samples": best["val_samples"]}


def safe_name(name: str) -> str:
    """A model name usable in a file name (samples_<name>.jsonl)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    if not s:
        raise KardiaError(f"model name {name!r}: needs at least one letter or digit")
    return s


def run_eval(cfg, models: Sequence[tuple[str, str]], data: str, out_dir: str, *, progress: bool = True,
             pools=None, samples: Optional[Sequence[TurnSample]] = None) -> dict:
    """Evaluate every (name, model_dir) on `data`; write the outputs into out_dir; return metrics.json's dict.
    `pools` (cluster.stage_pools.StagePools): the caller's, left open; else eval's own, released at the end."""
    from kardia_rl.evaluation import report
    from kardia_rl.utils.io import atomic_write_jsonl

    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise KardiaError(f"model names must be unique, got {names} (use --names)")
    if len({safe_name(n) for n in names}) != len(names):
        raise KardiaError(f"model names {names} collide once made file-safe; choose other --names")
    from kardia_rl.model.prepare import prepared_path

    # before loading data, the judge or any engine: a hub id or .gguf is prepared (span tokens added) like the
    # pipeline's model stage does; a missing or weightless model is one line naming it
    models = [(name, prepared_path(cfg, path, "--model/--compare")) for name, path in models]
    if samples is None:
        all_samples, source = load_eval_samples(cfg, data)
    else:
        all_samples, source = list(samples), data
    chosen = select_subset(all_samples, cfg.eval.max_samples, cfg.data.split_seed)
    from kardia_rl.rewards.unified import UnifiedReward

    from kardia_rl.rewards.judge.identity import judge_identity

    identity = judge_identity(cfg.judge)  # before the judge starts: a bad judge.calibration head is one line here
    from kardia_rl.cluster.stage_pools import StagePools

    own = pools is None
    pools = pools or StagePools(cfg, "eval")
    doc = {"data": data, "data_source": source, "n_samples": len(chosen), "n_available": len(all_samples),
           "judge": cfg.judge.backend, "judge_identity": identity,
           "judge_is_proxy": cfg.judge.backend == "embedding",
           "judge_malformed": bool(cfg.judge.judge_malformed),
           "decoding": {"greedy": cfg.eval.greedy, "temperature": None if cfg.eval.greedy else cfg.eval.temperature,
                        "top_p": None if cfg.eval.greedy else cfg.rollout.top_p,
                        "max_new_tokens": cfg.model.max_new_tokens, "seed": cfg.seed},
           "reward_weights": {"format": cfg.reward.format_weight, "emotion": cfg.reward.emotion_weight,
                              "rubric": cfg.reward.rubric_weight},
           "models": {}}
    try:
        reward = UnifiedReward.from_config(cfg, pools.judge)
        for name, path in models:
            rows, info = evaluate_model(cfg, name, path, chosen, reward, pools, progress=progress)
            samples_file = f"samples_{safe_name(name)}.jsonl"
            atomic_write_jsonl(os.path.join(out_dir, samples_file), rows)
            doc["models"][name] = {"model_path": path, "selection": policy_selection(path),
                                   "samples_file": samples_file,
                                   "metrics": recompute_metrics(rows), **info}
            report.write_eval_outputs(out_dir, doc)
            m = doc["models"][name]["metrics"]
            print(f"[eval] {name}: format {m['format_valid_rate']:.3f}  emotion acc {m['emotion_accuracy']:.3f}  "
                  f"reward {m['reward_mean']:.3f}  ({info['tokens_per_s']} tok/s, {info['samples_per_s']} samples/s "
                  f"with {info['engine']})")
    finally:
        if own:
            pools.close()
    return doc
