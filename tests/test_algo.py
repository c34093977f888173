"""Unit tests for kardia_rl.algo: hand-computed values, edge cases and micro-batch invariance."""
import math

import pytest
import torch

from kardia_rl.algo import (
    AdvantageResult,
    apply_kl_to_rewards,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    masked_mean,
    overlong_keep,
    overlong_penalty,
    policy_loss,
)

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def ragged_mask(lengths, T):
    return (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()


# ---- advantages
def test_grpo_advantages_hand_computed():
    res = group_advantages(REWARDS, 4, mode="grpo", eps=1e-6)
    assert isinstance(res, AdvantageResult)
    std0 = math.sqrt(1.0 / 3.0)  # unbiased std of [1,0,0,1]: sum sq dev = 4*0.25 = 1, / (4-1)
    a = 0.5 / (std0 + 1e-6)
    torch.testing.assert_close(res.advantages, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.group_mean, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(res.group_std, torch.tensor([std0, 0.0]))
    assert res.zero_std.tolist() == [False, True]
    assert res.keep.all()


def test_drgrpo_advantages_hand_computed():
    res = group_advantages(REWARDS, 4, mode="drgrpo")
    torch.testing.assert_close(res.advantages, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_batch_std_advantages_hand_computed():
    res = group_advantages(REWARDS, 4, mode="batch_std", eps=1e-6)
    # batch mean 1.25; squared deviations sum to 5.5; unbiased var 5.5/7
    bstd = math.sqrt(5.5 / 7.0)
    a = 0.5 / (bstd + 1e-6)
    torch.testing.assert_close(res.advantages, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6, rtol=0)
    assert res.zero_std.tolist() == [False, True]  # zero_std is still a per-group property


def test_eps_changes_grpo_scale():
    a_small = group_advantages(REWARDS, 4, eps=1e-6).advantages[0]
    a_big = group_advantages(REWARDS, 4, eps=1.0).advantages[0]
    assert a_big == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1.0), abs=1e-6)
    assert a_small > a_big


def test_default_eps_is_trls_and_near_tie_sizes():
    # rewards 0 vs 0.001: unbiased std sqrt(2) * 5e-4; the documented sizes (+-0.62 at 1e-4, +-0.71 at 1e-6)
    near_tie = torch.tensor([0.0, 0.001])
    std = math.sqrt(2) * 5e-4
    default = group_advantages(near_tie, 2).advantages
    torch.testing.assert_close(default, torch.tensor([-5e-4, 5e-4]) / (std + 1e-4))
    assert float(default[1]) == pytest.approx(0.62, abs=0.005)
    tiny_eps = float(group_advantages(near_tie, 2, eps=1e-6).advantages[1])
    clear_split = float(group_advantages(torch.tensor([0.0, 1.0]), 2, eps=1e-6).advantages[1])
    assert tiny_eps == pytest.approx(clear_split, abs=2e-3)  # why eps matters: a near-tie as big as 0 vs 1


# ---- overlong answers (DAPO)
def test_overlong_penalty_hand_computed():
    # max 10 tokens, buffer 4: no penalty up to 6, then a ramp down to -1 at 10
    pen = overlong_penalty([3, 6, 7, 8, 10], max_len=10, buffer=4)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty([12, 9], 10, 4, penalty=0.5), torch.tensor([-0.5, -0.375]))
    torch.testing.assert_close(overlong_penalty([10, 9], 10, 1), torch.tensor([-1.0, 0.0]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_len=0, buffer=1), "max_len"), (dict(max_len=10, buffer=0), "buffer"),
    (dict(max_len=10, buffer=11), "buffer"), (dict(max_len=10, buffer=2, penalty=-1.0), "penalty"),
])
def test_overlong_penalty_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty([1], **kwargs)


def test_overlong_keep_modes():
    truncated = [False, True, False, True]
    assert overlong_keep(truncated, "filter").tolist() == [True, False, True, False]
    assert overlong_keep(truncated, "keep").all() and overlong_keep(truncated, "penalty").all()
    with pytest.raises(ValueError, match="overlong mode"):
        overlong_keep(truncated, "drop")


def test_zero_std_detection_and_drop():
    res = group_advantages(REWARDS, 4, drop_zero_std=True)
    assert res.keep.tolist() == [True] * 4 + [False] * 4
    assert res.advantages[4:].abs().max() == 0
    s = res.stats()
    assert set(s) == {"adv_mean", "adv_std", "adv_max", "adv_min", "frac_zero_std"}
    assert all(isinstance(v, float) for v in s.values())
    assert s["frac_zero_std"] == pytest.approx(0.5)
    assert s["adv_mean"] == pytest.approx(0.0, abs=1e-6)
    assert s["adv_max"] == pytest.approx(-s["adv_min"])
    assert s["adv_max"] == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4), rel=1e-6)  # default eps 1e-4


def test_group_size_one():
    res = group_advantages(torch.tensor([3.0, -1.0, 7.0]), 1, drop_zero_std=True)
    assert res.advantages.tolist() == [0.0, 0.0, 0.0]
    assert res.zero_std.all() and not res.keep.any()
    assert res.group_std.tolist() == [0.0, 0.0, 0.0]
    for mode in ("drgrpo", "batch_std"):
        assert group_advantages(torch.tensor([3.0, -1.0]), 1, mode=mode).advantages.abs().max() == 0


def test_integer_rewards_are_accepted():
    res = group_advantages(torch.tensor([1, 0, 1, 0]), 2, mode="drgrpo")
    assert res.advantages.dtype.is_floating_point
    assert res.advantages.tolist() == [0.5, -0.5, 0.5, -0.5]


@pytest.mark.parametrize(
    "rewards,g,mode,match",
    [
        (torch.zeros(7), 4, "grpo", "multiple of group_size"),
        (torch.zeros(8), 0, "grpo", "group_size"),
        (torch.zeros(2, 4), 4, "grpo", "1-D"),
        (torch.tensor([1.0, float("nan")]), 2, "grpo", "NaN or inf"),
        (torch.tensor([1.0, float("inf")]), 2, "grpo", "NaN or inf"),
        (torch.zeros(4), 2, "ppo", "unknown advantage mode"),
    ],
)
def test_advantage_bad_inputs_raise(rewards, g, mode, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, g, mode=mode)


# ---- KL
def test_kl_known_values():
    logp = torch.tensor([0.0])
    ref = torch.tensor([math.log(0.5)])
    ln2 = math.log(2.0)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(ln2, abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * ln2**2, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + ln2 - 1.0, abs=1e-6)
    # other direction: ref more likely than the policy; k1 goes negative, k3 = e^{ln2} - ln2 - 1
    assert kl_penalty(ref, logp, "k1").item() == pytest.approx(-ln2, abs=1e-6)
    assert kl_penalty(ref, logp, "k3").item() == pytest.approx(2.0 - ln2 - 1.0, abs=1e-6)
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"), kl_penalty(logp, ref, "k3"))


def test_kl_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 9, generator=g), torch.randn(50, 9, generator=g)
    assert (kl_penalty(a, b, "k2") >= 0).all()
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert (kl_penalty(a, b, "k1") < 0).any()  # k1 is only unbiased, not pointwise >= 0
    for kind in ("k1", "k2", "k3"):
        assert kl_penalty(a, a.clone(), kind).abs().max() == 0


def test_kl_bad_args():
    with pytest.raises(ValueError, match="unknown kl kind"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="ref_logp shape"):
        kl_penalty(torch.zeros(2), torch.zeros(3))


def test_apply_kl_to_rewards():
    logp = torch.tensor([[0.0, -1.0, float("-inf")], [-0.5, -0.5, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, 0.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = apply_kl_to_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, beta=0.1, kind="k1")
    # k1 sums: seq0 = 1 + 0 (third token masked, -inf ignored); seq1 = 0.5 - 0.5 + 0 = 0
    torch.testing.assert_close(out, torch.tensor([0.9, 2.0]))
    assert not out.requires_grad
    k3 = apply_kl_to_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, beta=1.0, kind="k3")
    exp_seq1 = (math.exp(-0.5) + 0.5 - 1) + (math.exp(0.5) - 0.5 - 1)
    assert k3[1].item() == pytest.approx(2.0 - exp_seq1, abs=1e-6)
    with pytest.raises(ValueError, match="rewards"):
        apply_kl_to_rewards(torch.zeros(3), logp, ref, mask, beta=0.1)


def test_only_k1_gives_the_kl_gradient_as_a_reward_penalty():
    """Why the reward-KL default is k1: a reward acts through the score function E[grad log pi(y) * R(y)].
    Exact expectations over a 4-token vocabulary: with R = k1 that is grad KL(pi || ref); with k3 it is not."""
    logits = torch.tensor([0.3, -1.2, 0.8, 0.0], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([1.0, 0.0, -0.5, 0.2]), -1)
    logp = torch.log_softmax(logits, -1)
    (true_grad,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits, retain_graph=True)

    def score_function_grad(kind):
        penalty = kl_penalty(logp.detach(), ref, kind)
        (g,) = torch.autograd.grad((logp.exp().detach() * logp * penalty).sum(), logits, retain_graph=True)
        return g

    torch.testing.assert_close(score_function_grad("k1"), true_grad)
    assert (score_function_grad("k3") - true_grad).abs().max() > 1e-2


# ---- policy loss
def test_ratio_one_equals_minus_mean_advantage():
    B, T = 4, 5
    logp = torch.randn(B, T)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    mask = torch.ones(B, T)
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        loss, m = policy_loss(logp, logp.clone(), adv, mask, agg=agg)
        assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
        assert m["ratio_mean"] == pytest.approx(1.0) and m["ratio_max"] == pytest.approx(1.0)
        assert m["clip_frac"] == 0.0 and m["kl"] == 0.0 and m["is_weight_mean"] == 1.0
        assert m["policy_loss"] == pytest.approx(loss.item(), abs=1e-7)


def _clip_case():
    # row 0 has A > 0 and row 1 A < 0; each row also holds a ratio beyond the *other* side's bound, so a
    # metric that mixed up the advantage sign would give different fractions.
    ratios = torch.tensor([[1.5, 1.3, 0.7], [0.5, 0.6, 1.4]])
    old = torch.zeros(2, 3)
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    return logp, old, adv, torch.ones(2, 3)


def test_clipping_hand_case():
    logp, old, adv, mask = _clip_case()
    loss, m = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # A>0 row: min(r, clip(r)) = [1.2, 1.2 (both clipped), 0.7]; A<0 row: max(r, clip(r)) = [0.8, 0.8, 1.4]
    per_tok = torch.tensor([[-1.2, -1.2, -0.7], [0.8, 0.8, 1.4]])
    assert loss.item() == pytest.approx(per_tok.mean().item(), abs=1e-6)
    assert m["clip_frac_high"] == pytest.approx(2 / 6)
    assert m["clip_frac_low"] == pytest.approx(2 / 6)
    assert m["clip_frac"] == pytest.approx(4 / 6)
    assert m["ratio_max"] == pytest.approx(1.5) and m["ratio_mean"] == pytest.approx(6.0 / 6)
    loss.backward()
    clipped = torch.tensor([[True, True, False], [True, True, False]])
    assert (logp.grad[clipped] == 0).all()  # clipped tokens carry no gradient
    # unclipped gradient: d/dlogp of -r*A/6 = -r*A/6
    torch.testing.assert_close(logp.grad[0, 2], torch.tensor(-0.7 / 6))
    torch.testing.assert_close(logp.grad[1, 2], torch.tensor(1.4 / 6))


def test_clip_higher_changes_upper_clip_only():
    logp, old, adv, mask = _clip_case()
    loss, m = policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.4)
    per_tok = torch.tensor([[-1.4, -1.3, -0.7], [0.8, 0.8, 1.4]])  # only 1.5 > 1.4 is still clipped
    assert loss.item() == pytest.approx(per_tok.mean().item(), abs=1e-6)
    assert m["clip_frac_high"] == pytest.approx(1 / 6)
    assert m["clip_frac_low"] == pytest.approx(2 / 6)  # lower bound untouched
    loose, m2 = policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert m2["clip_frac_high"] == 0.0 and m2["clip_frac_low"] == pytest.approx(2 / 6)
    assert loose.item() == pytest.approx((-1.5 - 1.3 - 0.7 + 3.0) / 6, abs=1e-6)


def test_gradient_direction():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(2, 4, generator=g) - 1.0
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([2.0, -2.0])
    loss, _ = policy_loss(logp, old, adv, torch.ones(2, 4))
    loss.backward()
    assert (logp.grad[0] < 0).all()  # raising logp of a good token lowers the loss
    assert (logp.grad[1] > 0).all()
    with torch.no_grad():
        stepped = logp - 0.01 * logp.grad
    loss2, _ = policy_loss(stepped, old, adv, torch.ones(2, 4))
    assert loss2.item() < loss.item()


def test_kl_term_added_with_beta():
    g = torch.Generator().manual_seed(2)
    logp, old, ref = (torch.randn(3, 4, generator=g) for _ in range(3))
    adv, mask = torch.randn(3, generator=g), ragged_mask([4, 2, 3], 4)
    base, m0 = policy_loss(logp, old, adv, mask)
    with_kl, m1 = policy_loss(logp, old, adv, mask, beta=0.1, ref_logp=ref)
    kl_mean = masked_mean(kl_penalty(logp, ref, "k3"), mask)
    assert with_kl.item() == pytest.approx(base.item() + 0.1 * kl_mean.item(), abs=1e-6)
    assert m1["kl"] == pytest.approx(kl_mean.item(), abs=1e-6)
    assert m1["policy_loss"] == pytest.approx(m0["policy_loss"], abs=1e-7)  # metric excludes the KL term
    _, m_ref_only = policy_loss(logp, old, adv, mask, ref_logp=ref)  # beta 0: KL logged, not in the loss
    assert m_ref_only["kl"] == pytest.approx(kl_mean.item(), abs=1e-6)
    k1, _ = policy_loss(logp, old, adv, mask, beta=0.1, ref_logp=ref, kl_kind="k1")
    assert k1.item() == pytest.approx(base.item() + 0.1 * masked_mean(logp - ref, mask).item(), abs=1e-6)


def test_tis_weight_capped():
    old = torch.zeros(1, 3)
    engine = torch.tensor([[-math.log(3.0), math.log(2.0), 0.0]])  # w = exp(old - engine) = [3, 0.5, 1]
    adv = torch.tensor([1.0])
    logp = old.clone().requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 3), engine_logp=engine)
    # ratio 1 so pg = -A * w with w capped at the default 2.0
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 1.0) / 3, abs=1e-6)
    assert m["is_weight_mean"] == pytest.approx(3.5 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -0.5, -1.0]]) / 3)
    loss5, m5 = policy_loss(old, old, adv, torch.ones(1, 3), engine_logp=engine, is_cap=5.0)
    assert loss5.item() == pytest.approx(-4.5 / 3, abs=1e-6) and m5["is_weight_mean"] == pytest.approx(1.5)
    # the KL term is not reweighted
    ref = torch.full((1, 3), -0.3)
    lk, _ = policy_loss(old, old, adv, torch.ones(1, 3), engine_logp=engine, beta=0.5, ref_logp=ref)
    assert lk.item() == pytest.approx(loss.item() + 0.5 * kl_penalty(old, ref).mean().item(), abs=1e-6)


def _per_token_reference(logp, old, adv, eps=0.2):
    r = torch.exp(logp - old)
    a = adv.unsqueeze(-1)
    return -torch.min(r * a, r.clamp(1 - eps, 1 + eps) * a)


def test_agg_modes_match_hand_formulas():
    g = torch.Generator().manual_seed(3)
    B, T = 5, 6
    logp, old = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g) * 0.3
    old = logp + old
    adv = torch.randn(B, generator=g)
    mask = ragged_mask([6, 1, 3, 4, 2], T)
    pt = _per_token_reference(logp, old, adv) * mask
    tm, _ = policy_loss(logp, old, adv, mask, agg="token_mean")
    assert tm.item() == pytest.approx((pt.sum() / mask.sum()).item(), abs=1e-6)
    tm_g, _ = policy_loss(logp, old, adv, mask, agg="token_mean", num_tokens=100)
    assert tm_g.item() == pytest.approx((pt.sum() / 100).item(), abs=1e-6)
    sm, _ = policy_loss(logp, old, adv, mask, agg="seq_mean_token_mean")
    assert sm.item() == pytest.approx((pt.sum(-1) / mask.sum(-1)).mean().item(), abs=1e-6)
    sm_g, _ = policy_loss(logp, old, adv, mask, agg="seq_mean_token_mean", num_seqs=20)
    assert sm_g.item() == pytest.approx((pt.sum(-1) / mask.sum(-1)).sum().item() / 20, abs=1e-6)
    dr, _ = policy_loss(logp, old, adv, mask, agg="seq_mean_token_sum_norm")
    assert dr.item() == pytest.approx((pt.sum() / (B * T)).item(), abs=1e-6)
    dr_g, _ = policy_loss(logp, old, adv, mask, agg="seq_mean_token_sum_norm", num_seqs=10, max_len=32)
    assert dr_g.item() == pytest.approx((pt.sum() / (10 * 32)).item(), abs=1e-6)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("extras", [False, True])
def test_micro_batch_invariance(agg, extras):
    g = torch.Generator().manual_seed(4)
    B, T = 8, 7
    base = torch.randn(B, T, generator=g) - 1.0
    old = base + 0.3 * torch.randn(B, T, generator=g)  # enough drift that some tokens clip
    ref = base + 0.2 * torch.randn(B, T, generator=g)
    engine = old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = ragged_mask([7, 1, 4, 6, 2, 7, 3, 5], T)
    kw = dict(agg=agg, num_tokens=mask.sum(), num_seqs=B, max_len=10)
    if extras:
        kw.update(beta=0.05, ref_logp=ref, engine_logp=engine, clip_eps_high=0.28)

    full = base.clone().requires_grad_(True)
    loss_full, m_full = policy_loss(full, old, adv, mask, **kw)
    loss_full.backward()
    assert m_full["clip_frac"] > 0

    for n_micro in (1, 2, 4):
        leaf = base.clone().requires_grad_(True)
        total, pl_total = 0.0, 0.0
        for idx in torch.arange(B).chunk(n_micro):
            sub = {k: (v[idx] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in kw.items()}
            loss, m = policy_loss(leaf[idx], old[idx], adv[idx], mask[idx], **sub)
            loss.backward()
            total += loss.item()
            pl_total += m["policy_loss"]
        torch.testing.assert_close(leaf.grad, full.grad, atol=1e-6, rtol=0)
        assert total == pytest.approx(loss_full.item(), abs=1e-6)
        assert pl_total == pytest.approx(m_full["policy_loss"], abs=1e-6)


def test_default_normalisers_are_local():
    # Without global normalisers, two halves of a batch do NOT sum to the full loss: documents why the caller
    # must pass them (sanity check that the invariance test above is not vacuous).
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(4, 5, generator=g)
    adv = torch.randn(4, generator=g)
    mask = ragged_mask([5, 1, 2, 4], 5)
    full, _ = policy_loss(logp, logp, adv, mask)
    halves = sum(policy_loss(logp[s], logp[s], adv[s], mask[s])[0].item() for s in (slice(0, 2), slice(2, 4)))
    assert abs(halves - full.item()) > 1e-3


def test_padding_garbage_is_ignored():
    logp = torch.tensor([[-0.5, float("-inf")], [-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-0.4, float("nan")], [-1.0, -2.1]])
    ref = torch.tensor([[-0.6, float("inf")], [-1.1, -2.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    loss, m = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, beta=0.1, ref_logp=ref,
                          engine_logp=old)
    assert torch.isfinite(loss)
    assert all(math.isfinite(v) for v in m.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0


def test_empty_mask_gives_zero_loss():
    logp = torch.randn(2, 3, requires_grad=True)
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        loss, m = policy_loss(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3), agg=agg)
        assert loss.item() == 0.0 and m["ratio_max"] == 0.0 and m["clip_frac"] == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(old_logp=torch.zeros(2, 4)), "old_logp"),
        (dict(mask=torch.ones(3, 3)), "mask"),
        (dict(advantages=torch.zeros(2, 1)), "advantages"),
        (dict(ref_logp=torch.zeros(2, 2), beta=0.1), "ref_logp"),
        (dict(engine_logp=torch.zeros(3)), "engine_logp"),
        (dict(agg="seq_sum"), "agg"),
        (dict(kl_kind="k9", beta=0.1, ref_logp=torch.zeros(2, 3)), "kl_kind"),
        (dict(beta=0.1), "ref_logp is required"),
        (dict(num_tokens=0), "num_tokens"),
        (dict(agg="seq_mean_token_mean", num_seqs=0), "num_seqs"),
        (dict(agg="seq_mean_token_sum_norm", max_len=0), "max_len"),
        (dict(is_cap=2.0), "is_cap"),
    ],
)
def test_policy_loss_bad_args(kwargs, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(2),
                mask=torch.ones(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)
    with pytest.raises(ValueError, match="logp must be"):
        policy_loss(torch.zeros(6), torch.zeros(6), torch.zeros(1), torch.ones(6))


# ---- helpers
def test_entropy_from_logits():
    V = 7
    uniform = torch.zeros(2, 3, V)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(V)))
    peaked = torch.tensor([[[1e4, 0.0, -1e4]]])
    ent = entropy_from_logits(peaked)
    assert torch.isfinite(ent).all() and ent.item() == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 4, V, generator=g) * 3
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(entropy_from_logits(logits), (-(p * p.log()).sum(-1)).float(), atol=1e-5, rtol=0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    em = entropy_from_logits(logits, mask)
    assert (em[mask == 0] == 0).all() and torch.equal(em[mask == 1], entropy_from_logits(logits)[mask == 1])
    bf = entropy_from_logits(logits.bfloat16())
    assert bf.dtype == torch.float32 and torch.allclose(bf, entropy_from_logits(logits), atol=0.05)
    with pytest.raises(ValueError, match="mask shape"):
        entropy_from_logits(logits, torch.ones(3, 5))


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 3 + 5) / 4)
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 4.0]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
