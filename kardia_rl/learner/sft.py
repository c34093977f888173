"""The SFT stage: cross-entropy on the four-span answers (prompt masked), on the same DeepSpeed learner as
GRPO, with a validation loss on a capped, seeded sample of the validation turns (sft.max_val_samples). The
format check (greedy answers on that sample) runs after training on a rollout group, outside the ranks:
cluster.sft_check.

Batching: length-grouped batches by default (similar lengths per step, little padding). With
cfg.sft.packing several examples share one sequence, with position ids restarting per example and labels
that never cross a boundary. ATTENTION DOES CROSS example boundaries in a pack unless the model runs a
varlen kernel (flash_attention_2 reads the restarting position ids and isolates the examples); with the
default sdpa/eager kernels a packed example also sees the examples before it (cross-contamination). That is
a documented trade-off (packing is off by default, and length grouping already removes most padding).

Every rank runs `run_sft` (collective); rank 0 writes the model (atomically) and the result JSON.
Validation loss under W ranks: every rank makes the same number of collective calls, also a rank that has no
validation turn (W > turns): it runs all-ignored batches that add nothing to the sums.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any, Optional, Sequence

import torch

from kardia_rl.data import TurnSample, label_set
from kardia_rl.errors import KardiaError
from kardia_rl.format.spans import parse_spans
from kardia_rl.learner import batching as B
from kardia_rl.learner.distributed import all_reduce_
from kardia_rl.data.encoding import load_training_turns
from kardia_rl.data.splits import select_subset
from kardia_rl.learner.sft_data import SFTExample, build_examples
from kardia_rl.rewards.emotion_reward import credited_emotion
from kardia_rl.utils.io import atomic_write_jsonl, atomic_write_text


def ensure_model(cfg) -> str:
    """The folder to train: cfg.model.path prepared (builtin:SIZE built under run_dir, hub id / .gguf / a folder
    without span tokens prepared into run_dir/prepared_model; see kardia_rl.model.prepare)."""
    from kardia_rl.model.prepare import ensure_prepared

    return ensure_prepared(cfg)


def step_plan(examples: Sequence[SFTExample], cfg, world_size: int) -> list[list[tuple[list[int], list[int],
                                                                                        Optional[list[int]]]]]:
    """All optimizer steps up front: each a list of (input_ids, labels, position_ids) rows.

    Epochs may be fractional; cfg.sft.max_steps caps the total. Each epoch reshuffles (seed + epoch).
    Steps with fewer rows than ranks are dropped (every rank needs at least one row).
    """
    sc = cfg.sft
    rows = [(e.input_ids, e.labels, None) for e in examples]
    steps: list[list] = []
    per_epoch = None
    epoch = 0
    target = None
    while target is None or len(steps) < target:
        seed = cfg.seed + epoch
        if sc.packing:
            order = list(range(len(examples)))
            random.Random(seed).shuffle(order)
            packed, pos = B.pack_examples([(rows[i][0], rows[i][1]) for i in order], sc.max_seq_len)
            epoch_rows = [(ids, lab, p) for (ids, lab), p in zip(packed, pos)]
            batches = [list(range(i, min(i + sc.batch_size, len(epoch_rows))))
                       for i in range(0, len(epoch_rows), sc.batch_size)]
            random.Random(seed).shuffle(batches)
        else:
            epoch_rows = rows
            batches = B.length_grouped_batches([len(e) for e in examples], sc.batch_size, seed)
        batches = [b for b in batches if len(b) >= world_size]
        if not batches:
            raise KardiaError(f"sft.batch_size={sc.batch_size} gives no step with >= {world_size} rows")
        if per_epoch is None:
            per_epoch = len(batches)
            target = max(1, math.ceil(sc.epochs * per_epoch))
            if sc.max_steps > 0:
                target = min(target, sc.max_steps)
        steps.extend([epoch_rows[i] for i in b] for b in batches)
        epoch += 1
    return steps[:target]


def _collate(rows: Sequence[tuple], pad_id: int) -> dict:
    pos = [r[2] for r in rows] if rows and rows[0][2] is not None else None
    return B.collate_sft([(r[0], r[1]) for r in rows], pad_id, pos)


def validation_loss(learner, examples: Sequence[SFTExample], batch_size: int) -> float:
    """Token-mean CE over all validation targets; each rank scores its share (collective).

    A rank with fewer batches scores a batch whose labels are all ignored (adds 0 to sum and count), so
    every rank makes the same number of collective calls.
    """
    if not examples:
        return float("nan")
    pad = learner.tokenizer.pad_token_id
    mine = list(examples)[learner.rank::learner.world_size]
    n_batches = int(all_reduce_(torch.tensor([math.ceil(len(mine) / batch_size)], device=learner.device),
                                "max").item())
    s = n = 0.0
    for i in range(n_batches):
        chunk = mine[i * batch_size:(i + 1) * batch_size]
        if chunk:
            batch = B.collate_sft([(e.input_ids, e.labels) for e in chunk], pad)
        else:
            batch = B.collate_sft([(examples[0].input_ids, [B.IGNORE_INDEX] * len(examples[0]))], pad)
        ls, cnt = learner.sft_eval_loss(batch)  # already summed over ranks
        s, n = s + ls, n + cnt
    return s / max(n, 1.0)


def score_answers(samples: Sequence[TurnSample], texts: Sequence[str], cfg, keep_examples: int = 3) -> dict:
    """Format-valid rate and emotion accuracy of `texts` (one answer per sample, special tokens kept): a label
    counts only in a well-formed answer, the eval's rule. The answers come from a rollout group
    (cluster.sft_check), never from the learner ranks."""
    labels = label_set(cfg.data.emotion_labels or None)
    ok = emo = 0
    for s, t in zip(samples, texts):
        res = parse_spans(t, cfg.data.span_notation)
        ok += int(res.ok)
        emo += int(credited_emotion(res, labels, "strict") == s.emotion)
    n = len(samples)
    return {"format_valid_rate": ok / max(n, 1), "emotion_accuracy": emo / max(n, 1), "n": n,
            "examples": [{"id": s.id, "output": t} for s, t in list(zip(samples, texts))[:keep_examples]]}


class SFTTrainer:
    """The SFT stage as named phases, like `GRPOTrainer`: `setup` (model, examples, step plan, learner) ->
    `validate` -> `train` (one optimizer step per planned batch, validation every sft.eval_every) -> `save` ->
    `finish` (rank 0 writes the metrics and the result).
    Every phase that runs the model is collective: all ranks call it in the same order."""

    def __init__(self, cfg, out_dir: Optional[str] = None, *, train_samples: Optional[Sequence[TurnSample]] = None,
                 val_samples: Optional[Sequence[TurnSample]] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None, local_rank: Optional[int] = None,
                 master_port: Optional[int] = None, progress: bool = True):
        self.cfg, self.out_dir = cfg, out_dir or os.path.join(cfg.run_dir, "sft_model")
        self.train_samples, self.val_samples = train_samples, val_samples
        self.rank, self.world_size, self.local_rank, self.master_port = rank, world_size, local_rank, master_port
        self.progress = progress
        self.history: list[dict] = []

    # --- set-up -----------------------------------------------------------------------------------------
    def setup(self) -> "SFTTrainer":
        from transformers import AutoTokenizer

        from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner
        from kardia_rl.learner.ds_config import OptimSpec

        cfg = self.cfg
        self.t0 = time.time()
        threads = cfg.learner.cpu_threads
        if threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        model_path = ensure_model(cfg)
        if self.train_samples is None or self.val_samples is None:
            tr, va = load_training_turns(cfg)
            self.train_samples = tr if self.train_samples is None else self.train_samples
            self.val_samples = va if self.val_samples is None else self.val_samples
        self.val_total = len(self.val_samples)
        self.val_samples = val_sample(self.val_samples, cfg)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.train_ex, cut, prompts_cut = build_examples(self.train_samples, tokenizer, cfg)
        self.val_ex, _, _ = build_examples(self.val_samples, tokenizer, cfg)
        if prompts_cut and self.progress:
            print(f"[sft] warning: {prompts_cut} of {len(self.train_ex)} training prompts were cut to fit "
                  f"sft.max_seq_len={cfg.sft.max_seq_len}; generation sees the uncut prompts. Raise "
                  "sft.max_seq_len to avoid it.", flush=True)
        ws_hint = self.world_size if self.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
        self.plan = step_plan(self.train_ex, cfg, ws_hint)
        self.learner = DeepSpeedLearner(cfg, model_path, rank=self.rank, world_size=self.world_size,
                                        optim=OptimSpec.sft(cfg, total_steps=len(self.plan)),
                                        local_rank=self.local_rank, master_port=self.master_port)
        self.result: dict[str, Any] = {
            "model_path": model_path, "out_dir": self.out_dir, "train_examples": len(self.train_ex),
            "val_examples": len(self.val_ex), "val_turns_total": self.val_total, "targets_truncated": cut, "prompts_truncated": prompts_cut,
            "steps": len(self.plan), "world_size": self.learner.world_size, "val_loss_history": []}
        return self

    # --- the phases -------------------------------------------------------------------------------------
    def validate(self) -> float:
        return validation_loss(self.learner, self.val_ex, self.cfg.sft.micro_batch_size)

    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        learner, plan, every = self.learner, self.plan, self.cfg.sft.eval_every
        bar = tqdm(total=len(plan), desc="sft", disable=not self.progress or learner.rank != 0, dynamic_ncols=True)
        t_train = time.time()
        tokens = 0.0
        seq_tokens = sum(len(r[0]) for rows in plan for r in rows)
        for i, rows in enumerate(plan, start=1):
            m = self.step(rows)
            tokens += m["train/tokens"]
            m["step"] = i
            if (every > 0 and i % every == 0) or i == len(plan):
                m["val/loss"] = self.validate()
                self.result["val_loss_history"].append([i, m["val/loss"]])
            self.history.append(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['train/sft_loss']:.3f}",
                            **({"val": f"{m['val/loss']:.3f}"} if "val/loss" in m else {}))
        bar.close()
        r, history = self.result, self.history
        r["train_seconds"] = round(time.time() - t_train, 2)
        r["train_tokens_per_s"] = round(seq_tokens / max(r["train_seconds"], 1e-9), 1)  # all tokens
        r["target_tokens"] = tokens
        r["train_loss_first"] = history[0]["train/sft_loss"]
        r["train_loss_last"] = history[-1]["train/sft_loss"]
        r["val_loss_final"] = history[-1]["val/loss"]
        r["skipped_steps"] = learner.skipped_steps
        return history

    def step(self, rows: Sequence[tuple]) -> dict:
        """One optimizer step on this rank's contiguous share of a planned batch."""
        rank, ws = self.learner.rank, self.learner.world_size
        mine = rows[len(rows) * rank // ws:len(rows) * (rank + 1) // ws]
        return self.learner.sft_step(_collate(mine, self.learner.tokenizer.pad_token_id))

    def save(self) -> str:
        return self.learner.save_pretrained(self.out_dir)

    def finish(self) -> dict[str, Any]:
        self.result["seconds"] = round(time.time() - self.t0, 2)
        if self.learner.rank == 0:
            atomic_write_jsonl(os.path.join(self.out_dir, "sft_metrics.jsonl"), self.history)
            atomic_write_text(os.path.join(self.out_dir, "sft_result.json"), json.dumps(self.result, indent=2))
        return self.result


def val_sample(samples: Sequence[TurnSample], cfg) -> list[TurnSample]:
    """The validation turns SFT scores: at most sft.max_val_samples (0 = all), a seeded subset spread over the
    dialogues, the same for the loss, the format check and every run of the same config."""
    return select_subset(samples, cfg.sft.max_val_samples, cfg.seed)


def run_sft(cfg, out_dir: Optional[str] = None, *, train_samples: Optional[Sequence[TurnSample]] = None,
            val_samples: Optional[Sequence[TurnSample]] = None, rank: Optional[int] = None,
            world_size: Optional[int] = None, progress: bool = True, local_rank: Optional[int] = None,
            master_port: Optional[int] = None) -> dict[str, Any]:
    """Train, validate, save; returns (and rank 0 writes to `out_dir/sft_result.json`) the result dict.

    `train_samples` default to every training turn of cfg.data (the difficulty split passes the easy ones).
    One rank of a W-rank run when rank/world_size are given (cluster.learner_group.run_sft_on_group: the
    pipeline and the split's warm-ups), or of torchrun (RANK/WORLD_SIZE), else the only process.
    """
    t = SFTTrainer(cfg, out_dir, train_samples=train_samples, val_samples=val_samples, rank=rank,
                   world_size=world_size, local_rank=local_rank, master_port=master_port, progress=progress).setup()
    t.result["val_loss_initial"] = t.validate()
    t.train()
    t.save()
    return t.finish()
