"""The trainer's pure parts, without Ray: the prompt stream (trainer/prompt_source.py) and its resume through a
checkpoint's driver state (cluster/checkpoint.py), and the rollout's chunk layout and chunk seeds
(cluster/rollout.py; dispatch of the chunks to actors: tests/test_grpo_batch.py). Milliseconds."""
from __future__ import annotations

import random

import pytest

from kardia_rl.cluster.checkpoint import CheckpointManager, capture_rng, restore_rng
from kardia_rl.trainer.prompt_source import PromptSource
from kardia_rl.cluster.rollout import chunk_seed, contiguous_chunks

SAMPLES = [f"s{i}" for i in range(7)]


def batches(src: PromptSource, k: int) -> list[list[str]]:
    return [src.next_batch() for _ in range(k)]


def test_every_epoch_is_a_permutation_and_batches_run_across_epochs():
    src = PromptSource(SAMPLES, batch_size=3, seed=5)
    drawn = batches(src, 7)  # 21 draws = 3 epochs of 7, batches straddling the epoch ends
    assert all(len(b) == 3 for b in drawn)
    flat = [s for b in drawn for s in b]
    epochs = [flat[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == sorted(SAMPLES) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3, "each epoch draws a new order"
    assert (src.epoch, src.index) == (2, 7)


def test_order_depends_only_on_the_seed():
    assert batches(PromptSource(SAMPLES, 4, 1), 5) == batches(PromptSource(SAMPLES, 4, 1), 5)
    assert batches(PromptSource(SAMPLES, 4, 1), 5) != batches(PromptSource(SAMPLES, 4, 2), 5)


@pytest.mark.parametrize("stop_after", [1, 3, 7, 9])  # 3, 9 (across an epoch end), 21 (at one), 27 draws
def test_resume_draws_what_the_uninterrupted_stream_draws(stop_after):
    whole = batches(PromptSource(SAMPLES, 3, 3), 10)
    first = PromptSource(SAMPLES, 3, 3)
    done = batches(first, stop_after)
    resumed = PromptSource(SAMPLES, 3, 3)
    resumed.load_state_dict(first.state_dict())
    assert done + batches(resumed, 10 - stop_after) == whole


def test_resume_refuses_another_dataset_or_seed():
    state = PromptSource(SAMPLES, 2, 3).state_dict()
    with pytest.raises(ValueError, match="the data or the seed changed"):
        PromptSource(SAMPLES[:-1], 2, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="the data or the seed changed"):
        PromptSource(SAMPLES, 2, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="at least one sample"):
        PromptSource([], 2, 3)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSource(SAMPLES, 0, 3)


def test_driver_state_round_trip_through_a_checkpoint_resumes_stream_and_rngs(tmp_path):
    """What the driver stores at a step boundary (prompt position, RNG states) comes back from the checkpoint on
    disk, and the next prompts and random draws equal those of the run that was not interrupted."""
    import numpy as np
    import torch

    src = PromptSource(SAMPLES, 3, 9)
    batches(src, 2)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt = CheckpointManager(str(tmp_path)).save(2, {"prompts": src.state_dict(), "rng": capture_rng()},
                                                 lambda d: None)
    expected = (src.next_batch(), random.random(), float(np.random.rand()), float(torch.rand(1)))

    state = CheckpointManager.load_driver_state(CheckpointManager(str(tmp_path)).latest())
    assert CheckpointManager(str(tmp_path)).latest() == ckpt and state["step"] == 2
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # the resumed process starts elsewhere
    resumed = PromptSource(SAMPLES, 3, 9)
    resumed.load_state_dict(state["prompts"])
    restore_rng(state["rng"])
    assert (resumed.next_batch(), random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.parametrize("n_items, n_chunks", [(6, 2), (7, 3), (2, 5), (1, 1), (16, 4), (5, 1)])
def test_chunks_cover_the_prompts_once_in_order_and_balanced(n_items, n_chunks):
    chunks = contiguous_chunks(n_items, n_chunks)
    assert [i for c in chunks for i in c] == list(range(n_items))
    assert len(chunks) == min(n_items, n_chunks) and all(chunks)  # no empty chunk when actors outnumber prompts
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_chunk_seeds_are_distinct_per_seed_step_and_chunk_and_fit_56_bits():
    seeds = {chunk_seed(seed, step, chunk) for seed in range(3) for step in range(20) for chunk in range(8)}
    assert len(seeds) == 3 * 20 * 8
    assert all(0 <= s < 2 ** 56 for s in seeds)
    assert chunk_seed(1, 2, 3) == chunk_seed(1, 2, 3)


# --- checkpoint.keep_best (trainer/validation.py's BestPolicy) without Ray: a fake export -------------------------
def _fake_save(calls: list):
    import json
    import os

    def save(path: str) -> None:  # what save_pretrained leaves: a folder of files, published atomically
        from kardia_rl.utils.io import atomic_dir

        calls.append(path)
        with atomic_dir(path) as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"export": len(calls)}, f)
    return save


def test_best_policy_exports_only_improvements_and_a_resume_keeps_the_best(tmp_path):
    import json

    from kardia_rl.cluster.checkpoint import verify_checkpoint
    from kardia_rl.trainer.validation import BestPolicy, read_best

    best_dir, calls = str(tmp_path / "best_policy"), []
    best = BestPolicy(best_dir, _fake_save(calls), resumed=False, record={"val_samples": 4})
    seen = [best.offer(s, {"val/reward_mean": r})["val/best_reward_mean"] for s, r in ((2, 0.3), (4, 0.2), (6, 0.3),
                                                                                      (8, 0.5))]
    assert seen == [0.3, 0.3, 0.3, 0.5] and len(calls) == 2, "exported at steps 2 and 8 only (a tie keeps the earlier)"
    assert verify_checkpoint(best_dir) == []
    assert read_best(best_dir) == {"step": 8, "val_samples": 4, "val/reward_mean": 0.5}
    assert json.load(open(tmp_path / "best_policy" / "config.json")) == {"export": 2}

    resumed = BestPolicy(best_dir, _fake_save(calls), resumed=True)
    assert resumed.offer(10, {"val/reward_mean": 0.4}) == {"val/best_reward_mean": 0.5} and len(calls) == 2

    # a damaged export is not trusted on resume; a fresh run removes the previous run's best
    (tmp_path / "best_policy" / "config.json").write_text("{}")
    assert read_best(best_dir) is None
    BestPolicy(best_dir, _fake_save(calls), resumed=False)
    assert not (tmp_path / "best_policy").exists()


def test_validation_metrics_are_the_eval_tables_numbers():
    from conftest import ans

    from kardia_rl.engines.base import Completion
    from kardia_rl.rewards.answer_metrics import recompute_metrics, sample_row
    from kardia_rl.rewards.unified import RewardBreakdown
    from kardia_rl.trainer.validation import validation_metrics

    class S:  # a held-out sample: what sample_row reads
        def __init__(self, i, emotion):
            self.id, self.dialogue_id, self.turn, self.emotion = f"s{i}", f"d{i}", 1, emotion

    rows = []
    for i, (text, gold, total) in enumerate(((ans("anxious"), "anxious", 0.9), ("no spans", "sad", 0.0))):
        ok = i == 0
        b = RewardBreakdown(total=total, format=float(ok), emotion=float(ok), rubric=0.5 if ok else 0.0,
                            dims={"empathy": 4.0} if ok else {}, judged=ok)
        rows.append(sample_row(S(i, gold), "p", Completion([1, 2, 3], text, [0.0] * 3, "stop"), b, "val", "kardia"))
    m, v = recompute_metrics(rows), validation_metrics(rows)
    assert v["val/reward_mean"] == m["reward_mean"] == pytest.approx(0.45)
    assert v["val/format_rate"] == m["format_valid_rate"] == 0.5 and v["val/emotion_acc"] == 0.5
    assert v["val/empathy_mean"] == m["dims"]["empathy"]["mean"] == 2.5  # the unjudged answer at the floor 1
    assert v["val/response_len_mean"] == m["response_len_mean"] > 0


def test_rollout_group_and_reward_satisfy_the_protocols_generate_and_score_names():
    """generate_and_score is typed by ChunkGenerator / ChunkScorer; the real RolloutGroup and UnifiedReward
    provide every method with the parameters those protocols call them with."""
    import inspect

    from kardia_rl.cluster.rollout import ChunkGenerator, ChunkScorer
    from kardia_rl.cluster.rollout_group import RolloutGroup
    from kardia_rl.rewards.unified import UnifiedReward

    for proto, real in ((ChunkGenerator, RolloutGroup), (ChunkScorer, UnifiedReward)):
        for name, fn in vars(proto).items():
            if name.startswith("_") or not callable(fn):
                continue
            want = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
            have = inspect.signature(getattr(real, name)).parameters
            assert [p.name for p in want] == [p for p in have][:len(want)], (real.__name__, name)
            assert inspect.iscoroutinefunction(fn) == inspect.iscoroutinefunction(getattr(real, name)), name
