"""The transformers fallback engine: `model.generate` with left padding and num_return_sequences.

Log-probs come from generate's own `scores` (output_scores=True): in sampling mode these are the logits
AFTER the processors and warpers that produced the sample (temperature, then top-p), so log_softmax of
them is exactly the distribution each token was drawn from - the same quantity as vLLM's
processed_logprobs, with no second forward pass. To make that true the engine replaces the model's
generation_config with a neutral one (no top_k=50 default, no repetition penalty from generation_config.json)
and passes every sampling setting explicitly.

Seeding: generate samples with torch's global RNG (it takes no Generator), so each call runs inside
`torch.random.fork_rng` seeded from (seed, chunk index): same seed -> same samples, and the caller's RNG
state is left untouched (the constructor's `seed` is kept only for interface symmetry with vLLM).

Cost to know about: num_return_sequences copies each prompt n times BEFORE the prefill, so the prompt is
processed n times (vLLM prefills it once); with ~280-token prompts and n = 8 that is most of the gap in
bench/bench_generation.py.
"""
from __future__ import annotations

import torch

from kardia_rl.engines.base import (
    Completion, GenerationEngine, check_generate_args, check_probe, request_seed, resolve_dtype, stop_token_ids)
from kardia_rl.engines.verify import check_state_dict_keys, tied_embeddings
from kardia_rl.errors import KardiaError


class HFEngine(GenerationEngine):
    def __init__(self, model_path: str, *, seed: int = 0, dtype: str = "auto", max_model_len: int = 2048,
                 device: str | None = None, max_batch_sequences: int = 64, verify_reference: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.model_path = model_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device.type == "cuda")
        self.max_model_len = max_model_len
        self.max_batch_sequences = max_batch_sequences
        self.seed = seed
        self.verify_reference = verify_reference
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.stop_ids = stop_token_ids(self.tokenizer, model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, self.dtype))
        self.model.to(self.device).eval()
        self.model.generation_config = GenerationConfig()  # neutral: every setting comes from generate()
        self.tied = tied_embeddings(self.model.config)
        self.param_names = {n for n, _ in self.model.named_parameters()}

    def _gen_config(self, n, *, temperature, top_p, max_new_tokens, min_new_tokens, greedy):
        from transformers import GenerationConfig

        sample = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0,
                      num_return_sequences=n) if not greedy else dict(do_sample=False, num_return_sequences=1)
        return GenerationConfig(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None, eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id, output_scores=True, return_dict_in_generate=True, repetition_penalty=1.0,
            **sample)

    @torch.no_grad()
    def generate(self, prompts, n, *, temperature, top_p, max_new_tokens, seed, greedy=False, min_new_tokens=0):
        check_generate_args(prompts, n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            greedy=greedy, min_new_tokens=min_new_tokens, vocab_size=len(self.tokenizer),
                            max_model_len=self.max_model_len)
        config = self._gen_config(n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  min_new_tokens=min_new_tokens, greedy=greedy)
        per_chunk = max(1, self.max_batch_sequences // n)  # bounds memory: prompts x n sequences per generate
        results: list[list[Completion]] = []
        for c, start in enumerate(range(0, len(prompts), per_chunk)):
            chunk = [[int(t) for t in p] for p in prompts[start:start + per_chunk]]
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(request_seed(seed, c))
                results.extend(self._generate_chunk(chunk, n, config, greedy))
        return results

    def _generate_chunk(self, chunk, n, config, greedy):
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: every prompt ends at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=config)
        new = out.sequences[:, width:].cpu()
        # scores[t][row] = processed logits that produced token t of `row`; log_softmax -> sampling log-probs
        lps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1).cpu()
        token_lp = lps.gather(-1, new[:, :, None])[:, :, 0]
        rows = []
        for r in range(new.shape[0]):
            toks = new[r].tolist()
            stop_at = next((i for i, t in enumerate(toks) if t in self.stop_ids), None)
            length = len(toks) if stop_at is None else stop_at + 1
            keep = toks[:length]
            rows.append(Completion(token_ids=keep, text=self.decode(keep), logprobs=token_lp[r, :length].tolist(),
                                   finish_reason="length" if stop_at is None else "stop"))
        if greedy:  # greedy samples are identical: generate once, return n copies
            return [[Completion(c.token_ids[:], c.text, c.logprobs[:], c.finish_reason) for _ in range(n)]
                    for c in rows]
        return [rows[i * n:(i + 1) * n] for i in range(len(chunk))]

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        check_state_dict_keys(state_dict, self.param_names, self.tied, f"hf engine {self.model_path}")
        params = dict(self.model.named_parameters())
        for name, value in state_dict.items():
            if name not in params:
                continue  # tied lm_head.weight: it is embed_tokens.weight here
            if tuple(value.shape) != tuple(params[name].shape):
                raise KardiaError(f"state dict {name}: shape {tuple(value.shape)} != model's "
                                  f"{tuple(params[name].shape)}")
            params[name].copy_(value.detach().to(self.device, params[name].dtype))
        self._sync_reference(state_dict)

    @torch.no_grad()
    def probe_logprobs(self, probe_ids):
        check_probe(probe_ids, len(self.tokenizer))
        ids = torch.tensor([[int(t) for t in probe_ids]], device=self.device)
        logits = self.model(input_ids=ids).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].tolist()

    def shutdown(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
