"""GPU check for a machine with torch (CUDA), transformers, peft and accelerate only: no ray, deepspeed, vllm,
network or downloaded weights. Run by bench/gpu_check.sh; `--cpu` runs the same code small on CPU (a test does).

1. A bf16 learner step (the learner's own response_logprobs + policy_loss, torch AdamW) on a randomly
   initialised Qwen2 model built on the spot, with gradient checkpointing off and on: peak memory of the step
   above the memory held before it (torch.cuda.max_memory_allocated; CPU: peak RSS, see bench_learner.py),
   compared with the plan's estimate of activations + logits (kardia_rl/plan_estimate.py).
2. Learner vs engine log-probs in bf16 and fp32: the engine here is HF `generate` with a KV cache (incremental
   decoding, the way vLLM scores sampled tokens); the learner is one full forward without a cache on the same
   tokens. Prints max and mean |difference| over the response tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_model(args, dtype, device):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      intermediate_size=args.inter, max_position_embeddings=4096, tie_word_embeddings=False,
                      pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype), cfg


def _peak_reset(cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return float(torch.cuda.memory_allocated())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024.0


def _peak(cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    return _status_kb("VmHWM") * 1024.0


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def learner_steps(args, device, cuda: bool) -> list[dict]:
    import torch

    from kardia_rl.algo import group_advantages, policy_loss
    from kardia_rl.learner.batching import collate_rollout
    from kardia_rl.learner.logprobs import response_logprobs
    from kardia_rl.plan_estimate import activation_bytes, arch_from_config, logits_bytes

    model, cfg = build_model(args, torch.bfloat16, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    n = args.batch
    prompts = [torch.randint(2, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(2, args.vocab, (args.response_len,), generator=g).tolist() for _ in range(n)]
    adv = group_advantages(torch.rand(n, generator=g), min(8, n)).advantages
    batch = {k: (v.to(device) if torch.is_tensor(v) else v)
             for k, v in collate_rollout(prompts, responses, 0, advantages=adv).items()}

    def step() -> float:
        logp, _ = response_logprobs(model, batch)
        loss, _ = policy_loss(logp, logp.detach(), batch["advantages"], batch["response_mask"], clip_eps=0.2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: the baseline then holds them
        return float(loss.detach())

    arch = arch_from_config(cfg.to_dict())
    tokens = n * (args.prompt_len + args.response_len)
    rows = []
    model.train()
    for on in (False, True):
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        step()  # warm-up: optimizer state and gradient buffers exist before the measured step
        base = _peak_reset(cuda)
        t0 = time.perf_counter()
        loss = step()
        peak = _peak(cuda)
        est_act = activation_bytes(arch, tokens, 2, on)
        est_logits = logits_bytes(arch, n, args.response_len + 1, 2)
        rows.append({"checkpointing": on, "params_M": round(arch.params() / 1e6, 1), "tokens": tokens,
                     "step_s": round(time.perf_counter() - t0, 3), "loss_finite": loss == loss,
                     "step_peak_MiB": round((peak - base) / 2 ** 20, 1),
                     "plan_activations_plus_logits_MiB": round((est_act + est_logits) / 2 ** 20, 1)})
        measured = rows[-1]["step_peak_MiB"]  # below ~1 MiB (the --cpu smoke size) a ratio means nothing
        rows[-1]["plan_over_measured"] = round(rows[-1]["plan_activations_plus_logits_MiB"] / measured, 2) \
            if measured >= 1 else None
    del model, opt
    return rows


def logprob_agreement(args, device) -> list[dict]:
    import torch

    from kardia_rl.learner.batching import collate_rollout
    from kardia_rl.learner.logprobs import response_logprobs

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        model, _ = build_model(args, dtype, device)
        model.eval()
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(2, args.vocab, (args.batch, args.prompt_len), generator=g).to(device)
        with torch.no_grad():
            gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, top_k=0,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            new = gen.sequences[:, args.prompt_len:]
            # raw logits (scores would be after logits processors, e.g. min_new_tokens masking EOS)
            engine = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, new[:, i:i + 1]).squeeze(-1)
                                  for i, s in enumerate(gen.logits)], dim=1)
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate_rollout(
                prompt.tolist(), new.tolist(), 0).items()}
            learner = response_logprobs(model, batch)[0]
        d = (learner.float() - engine).abs()
        out.append({"dtype": str(dtype).replace("torch.", ""), "tokens": int(d.numel()),
                    "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())})
        del model
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run small on CPU (no GPU needed; what the test runs)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    for name, gpu_default, cpu_default in (("vocab", 32000, 512), ("hidden", 1024, 64), ("layers", 16, 2),
                                           ("inter", 2816, 176), ("heads", 16, 4), ("kv-heads", 4, 2),
                                           ("batch", 8, 2), ("prompt-len", 512, 16), ("response-len", 512, 16),
                                           ("gen-tokens", 64, 8)):
        p.add_argument(f"--{name}", type=int, default=None, help=f"default: GPU {gpu_default}, --cpu {cpu_default}")
        p.set_defaults(**{f"_{name.replace('-', '_')}_d": (gpu_default, cpu_default)})
    args = p.parse_args(argv)
    for k in list(vars(args)):
        if k.startswith("_") and k.endswith("_d"):
            name = k[1:-2]
            if getattr(args, name) is None:
                setattr(args, name, getattr(args, k)[1 if args.cpu else 0])
    import torch

    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        print("no CUDA device visible (use --cpu to run the check on CPU)", file=sys.stderr)
        return 2
    if args.cpu:
        torch.set_num_threads(1)
    device = torch.device("cuda" if cuda else "cpu")
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "method": __doc__.split("\n\n", 1)[1].strip()}
    res["learner_step"] = learner_steps(args, device, cuda)
    for r in res["learner_step"]:
        print(json.dumps(r), flush=True)
    res["logprob_agreement"] = logprob_agreement(args, device)
    for r in res["logprob_agreement"]:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
