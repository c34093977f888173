"""Validation during GRPO: every `algo.val_every` steps, right after the weight sync, the same
`algo.val_samples` held-out prompts are answered on the rollout group (at eval decoding: eval.greedy,
eval.temperature, one answer each) and judged on the judge pool, and the step logs val/*.

Held-out prompts: the validation split of data.path (data.val_fraction, split by data.split_seed, as SFT
validates on it); neither SFT (easy split) nor GRPO (hard split) trains on it, and the test split stays
untouched for the final table, so choosing the best policy on it does not leak into eval. The M prompts
are a seeded content-hashed choice (data.splits.select_subset, eval's subset rule), the same every time.

Numbers: the rows and metrics of the eval table (rewards.answer_metrics.sample_row / recompute_metrics),
so val/reward_mean is eval's Reward column on other prompts: val/{reward_mean, format_rate, emotion_acc,
<dimension>_mean (1-5, over all answers, unjudged at the floor as in eval), response_len_mean (words)},
plus val/best_reward_mean. The scoring uses its own UnifiedReward (on the same pool), so the training
step's judge/* reward statistics stay those of the rollout; the pool's per-step counters include both.

checkpoint.keep_best: a validation reward above the best so far exports the learner's policy as
run_dir/best_policy (the same save_pretrained export as `policy`, published atomically with best.json and a
manifest of sizes and checksums written last). A resumed run reads the best-so-far from there (verified);
a fresh run (no checkpoint resumed) removes a previous run's best_policy first.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Callable, Optional

from kardia_rl.errors import KardiaError

BEST_DIR = "best_policy"
BEST_RECORD = "best.json"  # inside best_policy: the step and val/* metrics it was chosen on
VAL_MODEL_NAME = "val"


def read_best(best_dir: str) -> Optional[dict]:
    """best.json of an intact best_policy export (manifest verified), else None (with a warning when a folder is
    there but damaged or half-written)."""
    from kardia_rl.cluster.checkpoint import verify_checkpoint

    if not os.path.isdir(best_dir):
        return None
    problems = verify_checkpoint(best_dir)
    if problems:
        print(f"warning: {best_dir} is damaged ({'; '.join(problems[:3])}); its best-so-far is not used",
              file=sys.stderr)
        return None
    with open(os.path.join(best_dir, BEST_RECORD)) as f:
        return json.load(f)


def validation_metrics(rows: list) -> dict:
    """val/* of one validation from its sample rows (the eval table's definitions)."""
    from kardia_rl.rewards.answer_metrics import recompute_metrics

    m = recompute_metrics(rows)
    out = {"val/reward_mean": m["reward_mean"], "val/format_rate": m["format_valid_rate"],
           "val/emotion_acc": m["emotion_accuracy"], "val/response_len_mean": m["response_len_mean"]}
    for d, s in m["dims"].items():
        if s["mean"] is not None:  # None when the judge is off (reward.rubric_weight=0): omitted, not NaN
            out[f"val/{d}_mean"] = s["mean"]
    return out


class Validation:
    """The validation phase of the GRPO step (driver: `self.validation.maybe_run(step, timing)`)."""

    def __init__(self, cfg, tokenizer, rollout, judge, learner, *, recover: Optional[Callable] = None,
                 resumed: bool = False):
        self.cfg, self.every = cfg, cfg.algo.val_every
        if self.every <= 0:
            return
        from kardia_rl.data import label_set
        from kardia_rl.data.encoding import encode_prompt, load_training_turns
        from kardia_rl.data.splits import select_subset
        from kardia_rl.rewards.unified import UnifiedReward

        held_out = load_training_turns(cfg)[1]
        if not held_out:
            raise KardiaError(f"algo.val_every={self.every}: the validation split of data.path {cfg.data.path!r} is "
                              f"empty (data.val_fraction={cfg.data.val_fraction}); raise data.val_fraction or set "
                              f"algo.val_every=0")
        self.samples = select_subset(held_out, cfg.algo.val_samples, cfg.data.split_seed)
        self.prompt_ids = [encode_prompt(s, tokenizer, cfg) for s in self.samples]
        self.prompt_texts = [tokenizer.decode(p, skip_special_tokens=False) for p in self.prompt_ids]
        self.labels = label_set(cfg.data.emotion_labels or None)
        self.rollout, self.recover = rollout, recover
        self.reward = UnifiedReward.from_config(cfg, judge)  # same pool, its own statistics
        self.best = BestPolicy(os.path.join(cfg.run_dir, BEST_DIR), learner.save_pretrained, resumed=resumed,
                               record={"num_steps": cfg.algo.num_steps, "val_samples": len(self.samples),
                                       "greedy": cfg.eval.greedy}) if cfg.checkpoint.keep_best else None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def maybe_run(self, step: int, timing: dict) -> dict:
        """val/* (and timing/validation) on a validation step, {} on the others."""
        if not self.due(step):
            return {}
        t0 = time.perf_counter()
        out = self.run(step)
        if self.best is not None:
            out.update(self.best.offer(step, out))
        timing["timing/validation"] = time.perf_counter() - t0
        return out

    def run(self, step: int) -> dict:
        """Answer and judge the M prompts on the current weights (the engines were just synced)."""
        from kardia_rl.rewards.answer_metrics import sample_row
        from kardia_rl.cluster.rollout import generate_and_score

        ec = self.cfg.eval
        self.reward.reset_stats()
        # The same seeds at every validation (step tag 0): with eval.greedy=false the answers still differ only
        # through the weights.
        res = generate_and_score(self.rollout, self.reward, self.samples, self.prompt_ids, n=1, seed=self.cfg.seed,
                                 step=0, recover=self.recover, max_restarts=self.cfg.rollout.max_restarts_per_step,
                                 sampling={"greedy": ec.greedy, "temperature": ec.temperature})
        rows = [sample_row(s, p, c, b, VAL_MODEL_NAME, self.cfg.data.span_notation, self.labels)
                for s, p, c, b in zip(self.samples, self.prompt_texts, res.completions, res.rewards)]
        return validation_metrics(rows)


class BestPolicy:
    """checkpoint.keep_best: the policy with the best val/reward_mean so far, exported by `save(dir)` (the learner's
    save_pretrained) into `best_dir`, published atomically with best.json and a manifest written last."""

    def __init__(self, best_dir: str, save: Callable[[str], object], *, resumed: bool, record: Optional[dict] = None):
        self.dir, self.save, self.record = best_dir, save, dict(record or {})
        self.best: Optional[dict] = None
        if resumed:
            self.best = read_best(best_dir)
        elif os.path.isdir(best_dir):  # a fresh run in a used run_dir: the old best is not this run's
            print(f"[validation] a fresh run: removing the previous run's {best_dir}", flush=True)
            shutil.rmtree(best_dir)

    def offer(self, step: int, val: dict) -> dict:
        """Export when val/reward_mean beats the best so far (ties keep the earlier); val/best_reward_mean."""
        if self.best is None or val["val/reward_mean"] > self.best["val/reward_mean"]:
            self.export(step, val)
        return {"val/best_reward_mean": self.best["val/reward_mean"]}

    def export(self, step: int, val: dict) -> str:
        from kardia_rl.cluster.checkpoint import write_manifest
        from kardia_rl.utils.io import atomic_dir, atomic_write_text

        record = {"step": step, **self.record, **val}
        with atomic_dir(self.dir) as tmp:
            self.save(tmp)  # the policy export (rank 0 writes; it replaces the empty tmp atomically)
            atomic_write_text(os.path.join(tmp, BEST_RECORD), json.dumps(record, indent=1))
            write_manifest(tmp, step)  # last: a folder without a valid manifest is never trusted
        self.best = record
        print(f"[validation] step {step}: val/reward_mean {val['val/reward_mean']:.4f} is the best so far: "
              f"exported {self.dir}", flush=True)
        return self.dir
