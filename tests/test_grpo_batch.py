"""The driver's batch building and the rollout dispatch, without Ray or models: a fake learner that records
which forwards it ran, fake rollout actors that record their calls, real configs and real reward records."""
from __future__ import annotations

import asyncio
import math
import os
from types import SimpleNamespace

import pytest
import torch

from kardia_rl.algo import group_advantages
from kardia_rl.config import RUBRIC_DIMENSIONS, load_config
from kardia_rl.engines.base import Completion
from kardia_rl.rewards.unified import RewardBreakdown
from kardia_rl.cluster.rollout import Rollout, generate_and_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "conf", "tiny.yaml")
MAX_NEW = 10


class FakeLearner:
    def __init__(self):
        self.calls: list[str] = []

    def compute_logprobs(self, batch, which):
        self.calls.append(which)
        value = -0.5 if which == "policy" else -0.8
        return torch.full(batch["response_mask"].shape, value) * batch["response_mask"]


def _trainer(*overrides):
    from kardia_rl.trainer.driver import GRPOTrainer

    cfg = load_config(TINY, [f"model.max_new_tokens={MAX_NEW}", "algo.group_size=4", *overrides])
    tr = GRPOTrainer(cfg, [object()], "unused")
    tr.tokenizer, tr.learner = SimpleNamespace(pad_token_id=0), FakeLearner()
    tr.reward, tr.judge, tr.dims = SimpleNamespace(stats_summary=dict), SimpleNamespace(actor_failures=0, step_counters=dict), \
        RUBRIC_DIMENSIONS
    tr.rollout = SimpleNamespace(step_restarts=0)  # the rollout group's per-step restart count (metrics)
    return tr


def _rollout(totals, lengths):
    """One prompt, len(totals) candidates; an answer of MAX_NEW tokens was cut ("length")."""
    comps = [Completion(token_ids=list(range(1, n + 1)), text="x", logprobs=[-1.0] * n,
                        finish_reason="length" if n >= MAX_NEW else "stop") for n in lengths]
    rewards = [RewardBreakdown(total=t, format=1.0, emotion=0.0, rubric=t) for t in totals]
    return Rollout([SimpleNamespace(emotion="sad")], [[5, 6, 7]], comps, rewards)


def test_kl_in_reward_runs_each_forward_once_and_hands_the_reference_on():
    tr = _trainer("algo.kl_in=reward", "algo.kl_beta=0.1", "algo.updates_per_step=2")
    batch, _ = tr.build_batch(_rollout([0.1, 0.2, 0.3, 0.4], [3, 4, 5, 6]))
    # one policy and one reference forward; the learner reuses both (no reference rerun for the KL log,
    # no second policy forward for the ratio's denominator)
    assert tr.learner.calls == ["policy", "ref"]
    mask = batch["response_mask"]
    torch.testing.assert_close(batch["ref_logprobs"], -0.8 * mask.float())
    torch.testing.assert_close(batch["old_logprobs"], -0.5 * mask.float())


def test_kl_in_loss_leaves_reference_to_the_learner():
    tr = _trainer("algo.kl_in=loss", "algo.kl_beta=0.1", "algo.updates_per_step=2")
    batch, _ = tr.build_batch(_rollout([0.1, 0.2, 0.3, 0.4], [3, 4, 5, 6]))
    assert tr.learner.calls == ["policy"] and "ref_logprobs" not in batch


@pytest.mark.parametrize("mode, keep", [("keep", [True] * 4), ("filter", [True, False, True, False])])
def test_overlong_filter_masks_only_truncated_answers(mode, keep):
    tr = _trainer(f"algo.overlong={mode}")
    rollout = _rollout([0.2, 0.9, 0.4, 0.1], [3, MAX_NEW, 5, MAX_NEW])
    batch, adv = tr.build_batch(rollout)
    assert batch["keep"].tolist() == keep
    # filtered answers still count in their group's statistics (DAPO): the advantages do not change
    torch.testing.assert_close(adv.advantages, group_advantages(torch.tensor([0.2, 0.9, 0.4, 0.1]), 4).advantages)
    m = tr.metrics(rollout, adv, {}, {})
    assert m["rollout/truncated"] == 2.0 and m["rollout/truncated_rate"] == 0.5


def test_overlong_penalty_reranks_the_group():
    tr = _trainer("algo.overlong=penalty", "algo.overlong_buffer=0.2", "algo.overlong_penalty=1.0")
    # buffer = 2 tokens of 10: 9 tokens lose 0.5, 10 (cut) lose 1
    rollout = _rollout([0.2, 0.9, 0.4, 0.8], [3, MAX_NEW, 5, 9])
    batch, adv = tr.build_batch(rollout)
    shaped = torch.tensor([0.2, 0.9 - 1.0, 0.4, 0.8 - 0.5])
    torch.testing.assert_close(adv.advantages, group_advantages(shaped, 4).advantages)
    assert adv.advantages[1] < 0 < adv.advantages[2]  # the best raw reward was cut off: now the worst
    assert batch["keep"].all()
    assert tr.metrics(rollout, adv, {}, {})["rollout/overlong_penalty_mean"] == pytest.approx(-1.5 / 4)


def test_advantage_eps_comes_from_config():
    rollout = _rollout([0.0, 0.001, 0.0, 0.001], [3, 3, 3, 3])
    _, adv = _trainer("algo.adv_eps=0.05").build_batch(rollout)
    std = math.sqrt(4 * 0.0005 ** 2 / 3)
    assert float(adv.advantages[1]) == pytest.approx(0.0005 / (std + 0.05), rel=1e-5)


def test_drgrpo_preset_reaches_the_batch():
    _, adv = _trainer("algo.preset=drgrpo").build_batch(_rollout([0.0, 1.0, 0.0, 1.0], [3, 3, 3, 3]))
    torch.testing.assert_close(adv.advantages, torch.tensor([-0.5, 0.5, -0.5, 0.5]))


# --- rollout dispatch -----------------------------------------------------------------------------------
class FakeGroup:
    """Mimics RolloutGroup.submit/done: an idle actor per call (in `order`), a RuntimeError when none is idle.
    Each candidate depends only on (prompt, seed, k): which actor served it must not matter."""

    def __init__(self, n_actors: int, order=None):
        self.actors = list(range(n_actors))
        self.order = order or self.actors
        self.outstanding = [0] * n_actors
        self.calls: list[tuple[int, list]] = []

    def submit(self, prompts, n, *, seed):
        idle = [k for k in self.order if self.outstanding[k] == 0]
        if not idle:
            raise RuntimeError("a second generate call queued on a busy actor")
        i = idle[0]
        self.outstanding[i] += 1
        self.calls.append((i, [p[0] for p in prompts]))

        async def result():
            await asyncio.sleep(0.001 * (len(self.actors) - i))  # actors finish in a different order
            return [[Completion([p[0], k], f"{p[0]}:{seed % 997}:{k}", [-1.0, -1.0], "stop") for k in range(n)]
                    for p in prompts]
        return i, result()

    def done(self, i):
        self.outstanding[i] -= 1


class FakeReward:
    async def score(self, samples, texts, groups):
        return [RewardBreakdown(total=(sum(map(ord, t)) % 1000) / 1000, format=1.0, emotion=0.0, rubric=0.0) for t in texts]


def _generate(group, n_prompts=6):
    prompts = [[100 + j] for j in range(n_prompts)]
    return generate_and_score(group, FakeReward(), list(range(n_prompts)), prompts, n=3, seed=7, step=2)


def test_one_generate_call_per_actor_with_a_config_only_layout():
    group = FakeGroup(2)
    _generate(group)
    assert sorted(i for i, _ in group.calls) == [0, 1]  # never two calls on one actor
    assert sorted(chunk for _, chunk in group.calls) == [[100, 101, 102], [103, 104, 105]]


def test_results_do_not_depend_on_which_actor_served_a_chunk():
    a = _generate(FakeGroup(3))
    b = _generate(FakeGroup(3, order=[2, 1, 0]))
    assert [c.text for c in a.completions] == [c.text for c in b.completions]
    assert [r.total for r in a.rewards] == [r.total for r in b.rewards]


def test_rollout_group_refuses_to_queue_on_a_busy_actor():
    from kardia_rl.cluster.rollout_group import RolloutGroup

    group = RolloutGroup.__new__(RolloutGroup)  # only the dispatch state: no Ray actors are started
    group.cfg = load_config(TINY)
    group.actors = [SimpleNamespace(generate=SimpleNamespace(remote=lambda *a: a)) for _ in range(2)]
    group.outstanding, group.in_flight, group.incarnation, group._faults = [0, 0], {}, [0, 0], {}
    first, second = group.submit([[1]], 2, seed=0)[0], group.submit([[2]], 2, seed=1)[0]
    assert {first, second} == {0, 1}
    with pytest.raises(RuntimeError, match="busy"):
        group.submit([[3]], 2, seed=2)
    group.done(second)
    assert group.submit([[3]], 2, seed=2)[0] == second


def test_rollout_group_sends_an_explicit_zero_temperature():
    from kardia_rl.cluster.rollout_group import RolloutGroup

    group = RolloutGroup.__new__(RolloutGroup)  # only the dispatch state: no Ray actors are started
    group.cfg = load_config(TINY, ["rollout.temperature=0.7"])
    group.actors = [SimpleNamespace(generate=SimpleNamespace(remote=lambda *a: a))]
    group.outstanding, group.in_flight, group.incarnation, group._faults = [0], {}, [0], {}
    assert group.submit([[1]], 2, seed=0, temperature=0.0)[1][2] == 0.0  # not replaced by rollout.temperature
    group.done(0)
    assert group.submit([[1]], 2, seed=0)[1][2] == 0.7  # None: the config's
