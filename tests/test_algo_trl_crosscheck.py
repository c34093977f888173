"""Cross-check kardia_rl.algo against TRL's GRPOTrainer (TRL 1.16).

How TRL is called (no transcription of the policy loss or advantage formulas):
  * a real, tiny GRPOTrainer is built locally (Qwen2Config with 1 layer / hidden 16, a WordLevel tokenizer built
    in memory; no downloads, CPU only);
  * advantages: ``GRPOTrainer._generate_and_score_completions`` is run end to end on hand-made prompts (the
    tiny model really generates) with a reward function that returns a per-row ``r`` column, so TRL's own
    group mean / std / scale_rewards code produces the advantages we compare with ``group_advantages``;
  * loss: ``GRPOTrainer._compute_loss`` is called with a hand-built inputs dict; only the model forward
    (``_get_per_token_logps_and_entropies``) is replaced on the instance so that it returns our random
    per-token log-probs as a leaf tensor. Everything after that (ratio, clipping, k3 KL, TIS multiply,
    loss_type aggregation, clip metrics) is TRL's code. Loss values and gradients w.r.t. the log-probs must
    agree to 1e-6.
The only transcribed line is TRL's vLLM importance-sampling ratio (``token_truncate`` mode, computed inside
``_generate_and_score_completions`` which needs vLLM), fed to TRL as ``inputs["importance_sampling_ratio"]``.
"""
import warnings

import pytest
import torch
from conftest import require

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns about the installed vLLM version on import
    require("trl")
    require("datasets")
    require("tokenizers")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

from kardia_rl.algo import group_advantages, kl_penalty, masked_mean, policy_loss

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
MAX_COMPLETION = 9  # > T below, so dr_grpo's constant normaliser is visibly not the tensor width
B, T, G = 8, 6, 4
TRL_EPS = 1e-4  # TRL adds 1e-4 to the std in _generate_and_score_completions


def _reward_from_column(prompts, completions, r, **kwargs):
    return [float(x) for x in r]


@pytest.fixture(scope="module")
def make_trainer(tmp_path_factory):
    cache = {}
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    dataset = Dataset.from_dict({"prompt": ["w1 w2", "w3 w4"], "r": [0.0, 1.0]})
    # Saved to a local folder and passed by path: with beta > 0 TRL re-creates the reference model from the
    # policy's config path, which must therefore exist locally (nothing is downloaded).
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    def make(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            cfg = dict(num_generations=G, per_device_train_batch_size=G, max_completion_length=MAX_COMPLETION,
                       use_bias_correction_kl=False)
            cfg.update(overrides)
            torch.manual_seed(0)
            args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), use_cpu=True, bf16=False,
                              report_to="none", save_strategy="no", logging_steps=1, **cfg)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tr = GRPOTrainer(model=str(model_dir), reward_funcs=_reward_from_column, args=args,
                                 train_dataset=dataset, processing_class=tokenizer)
            # What Trainer's training loop sets up: train mode ("train" metrics/normalisers) and the accumulation
            # count; 1 = no gradient accumulation, so TRL's per-call loss is not divided by it.
            tr.model.train()
            tr.current_gradient_accumulation_steps = 1
            assert tr.args.steps_per_generation == 1
            cache[key] = tr
        return cache[key]

    return make


# ---------------------------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale,mode", [("group", "grpo"), ("batch", "batch_std"), ("none", "drgrpo")])
@pytest.mark.parametrize("group_size", [2, 4])
def test_advantages_match_trl(make_trainer, scale, mode, group_size):
    tr = make_trainer(num_generations=group_size, per_device_train_batch_size=group_size, scale_rewards=scale)
    gen = torch.Generator().manual_seed(group_size * 10 + len(scale))
    n_groups = 3
    rewards = torch.randint(0, 9, (n_groups * group_size,), generator=gen).float() / 4 - 0.5
    rewards[:group_size] = 1.25  # one tied group: zero std, zero advantage
    inputs = [{"prompt": f"w{5 + i // group_size} w{6 + i // group_size}", "r": float(r)}
              for i, r in enumerate(rewards)]
    out = tr._generate_and_score_completions(inputs)
    ours = group_advantages(rewards, group_size, mode=mode, eps=TRL_EPS)
    torch.testing.assert_close(out["advantages"].float(), ours.advantages, atol=1e-6, rtol=0)
    assert ours.zero_std[0] and out["advantages"][:group_size].abs().max() == 0
    if scale != "batch":  # TRL's is_std_zero is per-group only in these modes
        trl_frac = tr._metrics["train"]["frac_reward_zero_std"][-1]
        assert trl_frac == pytest.approx(ours.stats()["frac_zero_std"])


# ---------------------------------------------------------------------------------------------- loss


def _batch(seed, off_policy):
    g = torch.Generator().manual_seed(seed)
    logp = -2.0 * torch.nn.functional.softplus(torch.randn(B, T, generator=g))
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    rewards = torch.randint(0, 5, (B,), generator=g).float() / 4
    adv = group_advantages(rewards, G, eps=TRL_EPS).advantages
    old = logp + 0.4 * torch.randn(B, T, generator=g) if off_policy else None
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    engine = logp + 0.5 * torch.randn(B, T, generator=g)
    return logp, mask, adv, old, ref, engine


def _run_trl(tr, monkeypatch, logp, mask, adv, old, ref, num_items, is_ratio=None):
    leaf = logp.clone().requires_grad_(True)
    monkeypatch.setattr(tr, "_get_per_token_logps_and_entropies",
                        lambda *a, **k: (leaf, torch.zeros_like(leaf), None))
    inputs = {
        "prompt_ids": torch.full((B, 2), 3, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.full((B, T), 4, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": torch.tensor(float(num_items)),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if tr.beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = tr._compute_loss(tr.model, inputs)
    loss.backward()
    return loss.detach(), leaf.grad


def _run_ours(logp, mask, adv, old, ref, beta, **kw):
    leaf = logp.clone().requires_grad_(True)
    old_ = logp if old is None else old  # TRL uses per_token_logps.detach() when old logps are absent
    loss, metrics = policy_loss(leaf, old_, adv, mask.float(), beta=beta, ref_logp=ref if beta else None, **kw)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


LOSS_TYPES = [("grpo", "seq_mean_token_mean"), ("dr_grpo", "seq_mean_token_sum_norm"),
              ("bnpo", "token_mean"), ("dapo", "token_mean")]


@pytest.mark.parametrize("loss_type,agg", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_loss_matches_trl(make_trainer, monkeypatch, loss_type, agg, beta, off_policy):
    eps_high = 0.28 if off_policy else None  # off-policy cases also exercise DAPO clip-higher
    tr = make_trainer(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=eps_high)
    seed = 1000 + 100 * LOSS_TYPES.index((loss_type, agg)) + 10 * int(beta > 0) + int(off_policy)
    logp, mask, adv, old, ref, _ = _batch(seed, off_policy)
    # dapo normalises by the GLOBAL token count; pretend other micro-batches hold 13 more tokens
    num_items = int(mask.sum()) + (13 if loss_type == "dapo" else 0)
    trl_loss, trl_grad = _run_trl(tr, monkeypatch, logp, mask, adv, old, ref, num_items)

    kw = dict(agg=agg, clip_eps=0.2, clip_eps_high=eps_high)
    if loss_type == "dapo":
        kw["num_tokens"] = num_items
    if loss_type == "dr_grpo":
        kw["max_len"] = MAX_COMPLETION
    loss, grad, m = _run_ours(logp, mask, adv, old, ref, beta, **kw)

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    torch.testing.assert_close(grad, trl_grad, atol=1e-6, rtol=0)
    trl_m = {k: v[-1] for k, v in tr._metrics["train"].items() if v}
    assert m["clip_frac_low"] == pytest.approx(trl_m["clip_ratio/low_mean"], abs=1e-6)
    assert m["clip_frac_high"] == pytest.approx(trl_m["clip_ratio/high_mean"], abs=1e-6)
    assert m["clip_frac"] == pytest.approx(trl_m["clip_ratio/region_mean"], abs=1e-6)
    if off_policy:
        assert m["clip_frac"] > 0  # the case really exercises clipping
    if beta:
        assert m["kl"] == pytest.approx(trl_m["kl"], abs=1e-6)


def test_tis_matches_trl_vllm_importance_sampling(make_trainer, monkeypatch):
    tr = make_trainer(loss_type="dapo", beta=0.04)
    logp, mask, adv, old, ref, _ = _batch(7, off_policy=True)
    engine = old + 0.9 * torch.randn(B, T, generator=torch.Generator().manual_seed(8))  # big enough to hit the cap
    cap = tr.vllm_importance_sampling_clip_max  # TRL default 3.0
    # Transcribed from TRL 1.16 grpo_trainer.py, GRPOTrainer._generate_and_score_completions
    # (vllm_importance_sampling_mode="token_truncate", clip_min None):
    #   per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    #   vllm_importance_sampling_ratio = torch.clamp(torch.exp(per_token_logps_diff), min=None, max=C_max)
    is_ratio = torch.clamp(torch.exp((old - engine) * mask), min=tr.vllm_importance_sampling_clip_min, max=cap)
    assert (is_ratio[mask.bool()] == cap).any()  # the cap is active somewhere
    # vLLM itself is not started; only the flags _compute_loss reads are set on the instance
    monkeypatch.setattr(tr, "use_vllm", True)
    monkeypatch.setattr(tr, "vllm_importance_sampling_correction", True)
    num_items = int(mask.sum())
    trl_loss, trl_grad = _run_trl(tr, monkeypatch, logp, mask, adv, old, ref, num_items, is_ratio=is_ratio)
    loss, grad, m = _run_ours(logp, mask, adv, old, ref, 0.04, agg="token_mean", engine_logp=engine, is_cap=cap)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    torch.testing.assert_close(grad, trl_grad, atol=1e-6, rtol=0)
    assert m["is_weight_mean"] == pytest.approx(masked_mean(is_ratio, mask).item(), abs=1e-6)


@pytest.mark.parametrize("off_policy", [False, True])
def test_trl_default_bias_corrected_kl_differs(make_trainer, monkeypatch, off_policy):
    """TRL 1.16 defaults to ``use_bias_correction_kl=True``: its KL term is ``ratio * k3`` with a differentiable
    ratio. We implement plain k3 (the brief's spec, and TRL with the flag off). Pin down the exact difference so
    a TRL upgrade that changes it is noticed: loss gap = beta * token_mean((ratio - 1) * k3); on-policy the
    values agree but the gradients do not (d ratio / d logp = 1 there)."""
    beta = 0.5
    tr = make_trainer(loss_type="bnpo", beta=beta, use_bias_correction_kl=True)
    logp, mask, adv, old, ref, _ = _batch(11, off_policy)
    trl_loss, trl_grad = _run_trl(tr, monkeypatch, logp, mask, adv, old, ref, int(mask.sum()))
    loss, grad, _ = _run_ours(logp, mask, adv, old, ref, beta, agg="token_mean")
    old_ = logp if old is None else old
    gap = beta * masked_mean((torch.exp(logp - old_) - 1) * kl_penalty(logp, ref, "k3"), mask)
    assert trl_loss.item() == pytest.approx(loss.item() + gap.item(), abs=1e-6)
    # d(ratio * k3)/dlogp - dk3/dlogp = ratio * k3 + (ratio - 1) * dk3/dlogp, with dk3/dlogp = 1 - exp(ref - logp)
    ratio, k3 = torch.exp(logp - old_), kl_penalty(logp, ref, "k3")
    extra = beta * (ratio * k3 + (ratio - 1) * (1 - torch.exp(ref - logp))) * mask / mask.sum()
    torch.testing.assert_close(trl_grad, grad + extra, atol=1e-6, rtol=0)
    assert (trl_grad - grad).abs().max() > 1e-3
