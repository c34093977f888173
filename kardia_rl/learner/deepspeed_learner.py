"""The DeepSpeed learner: one engine wrapper for GRPO updates (`train_step`) and SFT (`sft_step`).

One instance per data-parallel rank (a Ray actor, a torchrun rank, or the only process). Every method that
runs the model is COLLECTIVE: all ranks call it, in the same order, each with its own share of the batch.
The loss of each micro-batch is normalised by the GLOBAL token/sequence counts (all-reduced first), and
multiplied by the world size because DeepSpeed averages gradients over ranks; so the update is the same
whatever the micro-batch size or the number of ranks. Ranks pad their micro-batch count to the largest
(empty micro-batches contribute zero), because ZeRO reduces gradients inside every backward.

A step whose loss or gradient norm is not finite is skipped (no optimizer or LR-schedule step) and counted
in `train/skipped_steps`: a non-finite loss poisons its backward with NaN so that the gradient check, which
runs on the reduced gradient and therefore agrees on every rank, discards the step everywhere.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from kardia_rl.algo import policy_loss
from kardia_rl.config.specs import LossSpec, OptimSpec
from kardia_rl.errors import KardiaError
from kardia_rl.learner import batching as B
from kardia_rl.learner.distributed import all_reduce_, barrier, init_distributed, use_cuda
from kardia_rl.learner.ds_config import (ds_config, make_client_optimizer, param_groups,
                                         torch_dtype, warmup_lambda)
from kardia_rl.learner.export import hf_metadata, hf_state_dict, iter_hf_tensors, unwrap_peft, write_hf_folder
from kardia_rl.learner.logprobs import mismatch_sums, response_logprobs, sft_loss_sum
from kardia_rl.learner.model_init import count_checkpointed_calls, load_models
from kardia_rl.learner.span_rows import attach_span_rows, initial_span_rows

def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class DeepSpeedLearner:
    """An HF causal LM inside DeepSpeed (ZeRO 0-3), optionally with a LoRA adapter and a reference model.

    `optim` says what to optimise and how (learning rate, schedule, micro-batch, a reference model or not):
    `OptimSpec.grpo(cfg)` by default, `OptimSpec.sft(cfg, total_steps)` for supervised fine-tuning.
    """

    def __init__(self, cfg, model_path: str, *, rank: int = 0, world_size: int = 1,
                 optim: Optional[OptimSpec] = None, local_rank: Optional[int] = None,
                 master_port: Optional[int] = None):
        import deepspeed

        optim = optim if optim is not None else OptimSpec.grpo(cfg)
        self.cfg, self.optim, self.loss = cfg, optim, LossSpec.from_config(cfg)
        self.dist = init_distributed(rank, world_size, local_rank, master_port=master_port)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.cuda = use_cuda()
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if self.cuda else "cpu")
        self.dtype = torch_dtype(cfg.model.dtype, self.cuda)
        lc = cfg.learner
        self.zero_stage = int(lc.zero_stage)
        self.micro_batch_size, self.max_tokens = optim.micro_batch_size, lc.max_tokens_per_micro_batch
        need_ref = optim.reference
        conf = ds_config(zero_stage=self.zero_stage, micro_batch_size=self.micro_batch_size,
                         world_size=self.world_size, dtype=self.dtype, max_grad_norm=optim.max_grad_norm,
                         optimizer=optim.optimizer, lr=optim.lr, weight_decay=optim.weight_decay, cuda=self.cuda)
        # ZeRO-3: partitioned at load (deepspeed.zero.Init), no full copy per rank; else full load + reference copy
        # (learner/model_init.py)
        self.tokenizer, model, ref_model, self.added_tokens, self.partitioned_init = load_models(
            cfg, model_path, self.dtype, self.zero_stage, need_ref, conf)
        self.hf_config, self.generation_config = model.config, model.generation_config
        self.ckpt_calls = 0  # checkpointed layer calls since the last train/sft step began (a metric)
        if lc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            count_checkpointed_calls(model, self)
        self.lora = bool(cfg.model.lora.enabled)
        if self.lora:
            from peft import LoraConfig, get_peft_model

            lcfg = cfg.model.lora
            model = get_peft_model(model, LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                                     target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM"))
            # the span tokens' rows train as small deltas (untied head rows too); the reference switches them off
            self.span_rows_trained = attach_span_rows(model, self.tokenizer, lcfg.span_rows_lr_scale)
            if lc.gradient_checkpointing:
                model.enable_input_require_grads()
        client_opt = make_client_optimizer(model, zero_stage=self.zero_stage, optimizer=optim.optimizer,
                                           lr=optim.lr, weight_decay=optim.weight_decay,
                                           max_grad_norm=optim.max_grad_norm, cuda=self.cuda)
        lam = warmup_lambda(optim.warmup_steps, optim.total_steps, optim.schedule)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=client_opt, config=conf,
            model_parameters=None if client_opt is not None else param_groups(model.named_parameters(),
                                                                             optim.weight_decay, optim.lr),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam))
        # from_pretrained returns the model in eval mode and DeepSpeed does not change it; HF layers checkpoint
        # only `if self.gradient_checkpointing and self.training`, so updates must run in train mode.
        self.engine.train()
        self.global_step = 0  # train/sft steps attempted (applied + skipped)
        self.skipped_steps = 0
        self.ref = None
        if need_ref:
            self.ref = "adapter_disabled" if self.lora else self._wrap_ref(ref_model)

    # --- models ---------------------------------------------------------------------------------------
    def _begin_update(self) -> None:
        """Train mode for a gradient step (checkpointing, dropout); scoring switches to eval and back."""
        self.engine.train()
        self.ckpt_calls = 0

    def _update_metrics(self) -> dict:
        return {"train/grad_checkpointing": float(bool(self.cfg.learner.gradient_checkpointing)),
                "train/checkpointed_layer_calls": float(self.ckpt_calls)}

    def _wrap_ref(self, ref: torch.nn.Module):
        """The frozen reference on this rank's device; under ZeRO-3 partitioned by an inference-only engine."""
        if self.zero_stage == 3:
            import deepspeed

            conf = ds_config(zero_stage=3, micro_batch_size=self.micro_batch_size, world_size=self.world_size,
                             dtype=self.dtype, max_grad_norm=0.0, optimizer="torch_adamw", lr=0.0,
                             weight_decay=0.0, cuda=self.cuda, train=False)
            engine = deepspeed.initialize(model=ref, config=conf)[0]
            engine.eval()  # DeepSpeedEngine.eval() does not return the engine
            return engine
        return ref.to(self.device)

    @property
    def module(self) -> torch.nn.Module:
        """The trained model (HF or peft) inside the engine, e.g. for `generate` (collective under ZeRO-3)."""
        return self.engine.module

    @property
    def base_model(self) -> torch.nn.Module:
        return unwrap_peft(self.engine.module)[0]

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # --- helpers --------------------------------------------------------------------------------------
    def _synced(self, micro: list[dict], dummy_key: str) -> list[dict]:
        """Pad this rank's micro-batch list to the longest across ranks with zero-weight copies."""
        n = int(all_reduce_(torch.tensor([len(micro)], device=self.device), "max").item())
        if len(micro) < n:
            if not micro:
                raise KardiaError(f"rank {self.rank} got an empty batch; give every rank at least one row")
            dummy = dict(micro[0])
            dummy[dummy_key] = torch.full_like(dummy[dummy_key], B.IGNORE_INDEX if dummy_key == "labels" else 0)
            dummy["_rows"] = torch.zeros(0, dtype=torch.long)
            micro = micro + [dummy] * (n - len(micro))
        return micro

    def _sum(self, values: list[float], op: str = "sum") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return [float(x) for x in all_reduce_(t, op).cpu()]

    def _ref_logprobs(self, mb: dict, temperature: float) -> torch.Tensor:
        with torch.no_grad():
            if self.ref == "adapter_disabled":
                # no-grad scoring: eval mode (no checkpointing, no dropout), then back to the caller's mode
                was_training = self.engine.module.training
                self.engine.module.eval()
                try:
                    # the initial policy: adapter off, span rows at their initial values (learner/span_rows.py)
                    with self.engine.module.disable_adapter(), initial_span_rows(self.engine.module):
                        return response_logprobs(self.engine.module, mb, temperature=temperature)[0]
                finally:
                    self.engine.module.train(was_training)
            return response_logprobs(self.ref, mb, temperature=temperature)[0]

    def _finish_step(self, bad_loss: bool) -> dict:
        """Optimizer step (skipped by the overflow check on non-finite gradients)."""
        lr = self.lr()
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")
        if bad_loss and applied:  # cannot happen with the NaN poisoning; never apply such a step silently
            raise RuntimeError("a step with a non-finite loss was applied; the overflow check did not fire")
        self.global_step += 1
        self.skipped_steps += int(not applied)
        return {"train/grad_norm": gn, "train/lr": lr, "train/skipped_steps": float(self.skipped_steps),
                "train/step_applied": float(applied)}

    # --- GRPO -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, batch: dict, which: str = "policy") -> torch.Tensor:
        """Response logprobs [B, T] (CPU, fp32, 0 at padding) under the policy or the reference."""
        if which not in ("policy", "ref"):
            raise ValueError(f"which must be 'policy' or 'ref', got {which!r}")
        if which == "ref" and self.ref is None:
            raise KardiaError("no reference model: it is loaded only when algo.kl_beta > 0")
        temp = self.loss.temperature
        b = _to(batch, self.device)
        out = torch.zeros(b["response_mask"].shape, dtype=torch.float32)
        micro = self._synced(B.rollout_micro_batches(b, self.micro_batch_size, self.max_tokens), "response_mask")
        was_training = self.engine.module.training
        self.engine.module.eval()
        try:
            for mb in micro:
                lp = self._ref_logprobs(mb, temp) if which == "ref" else \
                    response_logprobs(self.engine, mb, temperature=temp)[0]
                rows = mb["_rows"]
                if rows.numel():
                    out[rows, :lp.shape[1]] = lp.float().cpu()
        finally:
            self.engine.module.train(was_training)
        return out

    def train_step(self, batch: dict) -> dict:
        """One GRPO optimizer step on this rank's share of a rollout batch (layout: batching.py).

        Needs input_ids, attention_mask, position_ids, response_mask, advantages; optional old_logprobs
        (default: the current policy's, detached: on-policy ratio 1), ref_logprobs (computed here when the
        KL term needs them), engine_logprobs (for algo.importance_correction), keep (rows to train on).
        """
        ls = self.loss
        for k in ("input_ids", "attention_mask", "position_ids", "response_mask", "advantages"):
            if k not in batch:
                raise KardiaError(f"train_step batch lacks {k!r} (see kardia_rl.learner.batching)")
        tis = ls.importance_correction_on(engine_fp32=self.dtype == torch.float32)
        # one-step-off with behaviour_logprobs=engine: old_logprobs ARE the engine's, so the mismatch is measured
        # against this pass's own forward instead
        engine_old = ls.engine_old
        if tis and "engine_logprobs" not in batch:
            raise KardiaError("algo.importance_correction is on but the batch has no engine_logprobs")
        b = _to(batch, self.device)
        if "keep" in b:
            b["response_mask"] = b["response_mask"] * b["keep"].to(b["response_mask"].dtype).unsqueeze(-1)
        mask = b["response_mask"]
        n_tok, n_seq = self._sum([float(mask.sum()), float((mask.sum(-1) > 0).sum())])
        if n_tok == 0:  # every group dropped (or empty responses): nothing to learn, nothing to step
            return {"train/empty_batch": 1.0, "train/tokens": 0.0, "train/lr": self.lr(),
                    "train/skipped_steps": float(self.skipped_steps)}
        self._begin_update()
        temp = ls.temperature
        micro = self._synced(B.rollout_micro_batches(b, self.micro_batch_size, self.max_tokens), "response_mask")
        sums = dict.fromkeys(("loss", "policy_loss", "kl", "entropy", "clip_frac", "clip_frac_low",
                              "clip_frac_high", "is_clip_frac", "diff_sum", "mismatch_kl_sum"), 0.0)
        bad = 0.0
        for mb in micro:
            m = mb["response_mask"]
            logp, ent = response_logprobs(self.engine, mb, temperature=temp, with_entropy=True)
            ref = mb.get("ref_logprobs")
            if ref is None and self.ref is not None:
                ref = self._ref_logprobs(mb, temp)
            old = mb.get("old_logprobs", logp.detach())
            eng = mb.get("engine_logprobs") if tis else None
            if "engine_logprobs" in mb:  # engine/learner mismatch on the sampled tokens (pre-update learner)
                learner_old = logp.detach() if engine_old else mb.get("old_logprobs", logp.detach())
                mismatch_sums(sums, learner_old, mb["engine_logprobs"], m)
            loss, met = policy_loss(
                logp, old, mb["advantages"], m, clip_eps=ls.clip_eps, clip_eps_high=ls.clip_eps_high,
                beta=ls.beta_in_loss, ref_logp=ref, kl_kind=ls.kl_estimator, agg=ls.loss_agg, num_tokens=n_tok,
                num_seqs=n_seq, max_len=ls.max_new_tokens, engine_logp=eng,
                is_cap=ls.is_cap if eng is not None else None)
            finite = bool(torch.isfinite(loss))
            bad += float(not finite)
            # NaN poison: makes the (rank-agreed) gradient check discard the whole step.
            to_backward = loss if finite else logp.sum() * float("nan")
            self.engine.backward(to_backward * self.world_size, scale_wrt_gas=False)
            k = float(m.sum())
            sums["loss"] += float(loss.detach())
            sums["policy_loss"] += met["policy_loss"]
            for name in ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "is_clip_frac"):
                sums[name] += met[name] * k
            sums["entropy"] += float((ent * m).sum())
        diff_max = sums.pop("diff_max", 0.0)
        red = self._sum(list(sums.values()) + [bad])
        out = self._finish_step(bad_loss=red[-1] > 0)
        for (name, _), v in zip(sums.items(), red):
            out[f"train/{name}"] = v if name in ("loss", "policy_loss") else v / n_tok
        if "engine_logprobs" in b:
            out["rollout/logprob_diff_mean"] = out.pop("train/diff_sum")
            out["rollout/mismatch_kl"] = out.pop("train/mismatch_kl_sum")
            out["rollout/logprob_diff_max"] = self._sum([diff_max], "max")[0]
        else:
            del out["train/diff_sum"], out["train/mismatch_kl_sum"]
        out["train/tokens"], out["train/sequences"] = n_tok, n_seq
        out.update(self._update_metrics())
        return out

    # --- SFT ------------------------------------------------------------------------------------------
    def _sft_counts(self, b: dict) -> float:
        return self._sum([float((b["labels"][:, 1:] != B.IGNORE_INDEX).sum())])[0]

    def sft_step(self, batch: dict) -> dict:
        """One optimizer step of token-mean cross-entropy on labelled (target) tokens of this rank's rows."""
        b = _to(batch, self.device)
        n_tok = self._sft_counts(b)
        if n_tok == 0:
            raise KardiaError("SFT batch has no target tokens (all labels are -100)")
        micro = self._synced(B.sft_micro_batches(b, self.micro_batch_size, self.max_tokens), "labels")
        self._begin_update()
        total, bad = 0.0, 0.0
        for mb in micro:
            s, _ = sft_loss_sum(self.engine, mb)
            loss = s / n_tok
            finite = bool(torch.isfinite(loss))
            bad += float(not finite)
            self.engine.backward((loss if finite else s * float("nan")) * self.world_size, scale_wrt_gas=False)
            total += float(loss.detach())
        total, bad = self._sum([total, bad])
        out = self._finish_step(bad_loss=bad > 0)
        out.update({"train/sft_loss": total, "train/tokens": n_tok, **self._update_metrics()})
        return out

    @torch.no_grad()
    def sft_eval_loss(self, batch: dict) -> tuple[float, float]:
        """(summed CE, target tokens) over this batch, all-reduced over ranks (collective)."""
        b = _to(batch, self.device)
        micro = self._synced(B.sft_micro_batches(b, self.micro_batch_size, self.max_tokens), "labels")
        was_training = self.engine.module.training
        self.engine.module.eval()
        try:
            s, n = 0.0, 0
            for mb in micro:
                ls, cnt = sft_loss_sum(self.engine, mb)
                s, n = s + float(ls), n + cnt
        finally:
            self.engine.module.train(was_training)
        s, n = self._sum([s, float(n)])
        return s, n

    # --- export / checkpoints -------------------------------------------------------------------------
    def hf_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Full weights in HF naming on CPU (LoRA merged; gathered under ZeRO-3, so collective). keep=False: only
        join the gathers, return {} (the ranks whose copy nobody reads)."""
        return hf_state_dict(self.engine.module, zero3=self.zero_stage == 3, keep=keep)

    def weight_metadata(self) -> list[tuple[str, str, list[int]]]:
        """(HF name, dtype, full shape) of every exported tensor, in `iter_weights` order."""
        return hf_metadata(self.engine.module)

    def iter_weights(self, bucket_bytes: int):
        """Stream the exported weights on this rank's device (LoRA merged; ZeRO-3: gathered one bucket at a
        time, so all ranks must iterate together; only rank 0's tensors are sent)."""
        return iter_hf_tensors(self.engine.module, zero3=self.zero_stage == 3, device=self.device,
                               bucket_bytes=bucket_bytes)

    @torch.no_grad()
    def probe_logprobs(self, probe_ids: list[int]) -> list[float]:
        """Temperature-1 log-prob of each probe token given the previous ones, from this learner's own
        forward in its own dtype: what a synced engine must reproduce. Collective under ZeRO-3."""
        ids = torch.tensor([list(probe_ids)], dtype=torch.long, device=self.device)
        was_training = self.engine.module.training
        self.engine.module.eval()
        try:
            logits = self.engine.module(input_ids=ids).logits[0, :-1].float()
        finally:
            self.engine.module.train(was_training)
        return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].cpu().tolist()

    def save_pretrained(self, out_dir: str) -> str:
        """An HF folder (weights, config, generation config, tokenizer) written atomically by rank 0, one shard at
        a time as the tensors arrive; under ZeRO-3 the other ranks only join the gathers (no copy). Collective."""
        module = self.engine.module
        tensors = iter_hf_tensors(module, zero3=self.zero_stage == 3, keep=self.rank == 0)
        if self.rank == 0:
            write_hf_folder(tensors, hf_metadata(module), out_dir, self.hf_config,
                            generation_config=self.generation_config, tokenizer=self.tokenizer)
        else:
            for _ in tensors:  # the gathers are collective: walk them in lockstep with rank 0
                pass
        barrier()
        return out_dir

    def save_checkpoint(self, ckpt_dir: str, client_state: Optional[dict] = None) -> str:
        """DeepSpeed checkpoint (module, optimizer, LR schedule, our counters) under `ckpt_dir/step<N>`.

        DeepSpeed writes the `latest` pointer only after every shard is written, so an interrupted save
        leaves `latest` on the previous complete checkpoint. Collective.
        """
        state = dict(client_state or {})
        state["kardia_learner"] = {"global_step": self.global_step, "skipped_steps": self.skipped_steps}
        tag = f"step{self.global_step}"
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=state)
        barrier()
        return tag

    def load_checkpoint(self, ckpt_dir: str, tag: Optional[str] = None) -> dict:
        """Restore a `save_checkpoint` (latest tag by default); returns the client state. Collective."""
        path, state = self.engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if path is None:
            raise KardiaError(f"{ckpt_dir}: no DeepSpeed checkpoint found (tag={tag or 'latest'})")
        own = (state or {}).get("kardia_learner", {})
        self.global_step = int(own.get("global_step", self.global_step))
        self.skipped_steps = int(own.get("skipped_steps", self.skipped_steps))
        return state or {}

    def param_norm(self) -> float:
        """L2 norm of the exported weights (a cheap 'did anything change' probe for tests/logs)."""
        return math.sqrt(sum(float(t.float().pow(2).sum()) for t in self.hf_state_dict().values()))

