import os
import re
import subprocess
import sys

import pytest

from kardia_rl.config import documented_fields, from_dict, load_config, to_dict
from kardia_rl.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "conf", "tiny.yaml")


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_tiny_config_loads_and_overrides_apply():
    cfg = load_config(TINY, ["algo.group_size=4", "judge.backend=openai", "model.lora.r=8"])
    assert cfg.algo.group_size == 4 and cfg.judge.backend == "openai" and cfg.model.lora.r == 8
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("conf", ["tiny.yaml", "cluster.yaml", "smollm2.yaml"])
def test_every_yaml_key_documented_and_matches_schema(conf):
    path = os.path.join(ROOT, "conf", conf)
    assert os.path.exists(path), f"{path} is missing"
    import yaml

    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        if re.match(r"^\s*[A-Za-z_]+:", line):
            assert "#" in line, f"{conf}:{i}: key without a one-line comment: {line!r}"
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in ("judge.dimension_weights", "judge.chat_template_kwargs", "judge.extra_body"):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(yaml.safe_load("\n".join(lines)))
    schema_keys = {k for k, _, _ in documented_fields()}
    assert set(flat) - schema_keys == set()
    if conf == "tiny.yaml":  # the embedded default lists every key
        assert schema_keys - set(flat) == set()
    assert all(doc for _, _, doc in documented_fields()), "every schema key needs a doc string"


def test_unknown_key_reports_file_line_and_suggestion(tmp_path):
    p = _write(tmp_path, "seed: 1\nalgo:\n  grop_size: 8\n  clip_eps: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:3: algo.grop_size: unknown key (did you mean 'group_size'?)" in str(e.value)


def test_wrong_type_and_override_errors_all_reported(tmp_path):
    p = _write(tmp_path, "algo:\n  clip_eps: abc\nlearner:\n  zero_stage: two\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["reward.format_weight=x", "judge.nope=1", "noequals"])
    msg = str(e.value)
    assert f"{p}:2: algo.clip_eps: expected float, got 'abc'" in msg
    assert f"{p}:4: learner.zero_stage: expected int, got 'two'" in msg
    assert "override 'reward.format_weight=x': reward.format_weight: expected float, got 'x'" in msg
    assert "override 'judge.nope=1': judge.nope: unknown key" in msg
    assert "override 'noequals': expected key=value" in msg


@pytest.mark.parametrize("overrides, expected", [
    (["learner.micro_batch_size=3"], "not divisible by learner.micro_batch_size * learner.num_workers = 3 * 1 = 3"),
    (["rollout.num_actors=0"], "rollout.num_actors: must be >= 1, got 0"),
    (["judge.num_actors=0"], "judge.num_actors: must be >= 1, got 0"),
    (["reward.format_weight=-1"], "reward.format_weight: must be >= 0, got -1"),
    (["reward.format_weight=0", "reward.emotion_weight=0", "reward.rubric_weight=0"], "are all 0"),
    (["rollout.temperature=0"], "rollout.temperature: must be > 0, got 0"),
    (["judge.backend=gpt"], "judge.backend: 'gpt' is not one of"),
    (["algo.group_size=1"], "group-normalised advantages need at least 2 candidates"),
    (["judge.dimension_weights={empathy: 1, kindness: 2}"], "unknown dimension(s) ['kindness']"),
    (["sft.batch_size=10", "sft.micro_batch_size=4"], "sft.batch_size (10) must be a multiple"),
    (["algo.advantage=drgrpo"], "algo.advantage='drgrpo' with algo.loss_agg='token_mean' is half of Dr. GRPO"),
    (["algo.loss_agg=seq_mean_token_sum_norm"], "is half of Dr. GRPO"),
    (["algo.preset=drgrpo", "algo.advantage=grpo"], "is half of Dr. GRPO"),
    (["algo.preset=ppo"], "algo.preset: 'ppo' is not one of"),
    (["algo.overlong=truncate"], "algo.overlong: 'truncate' is not one of"),
    (["algo.overlong_buffer=0"], "algo.overlong_buffer: must be in (0, 1]"),
    (["algo.adv_eps=0"], "algo.adv_eps: must be > 0"),
    (["rollout.top_p=0.9"], "rollout.top_p: must be 1 for GRPO, got 0.9"),
    (["model.lora.span_rows_lr_scale=0"], "model.lora.span_rows_lr_scale: must be > 0, got 0"),
    (["synth.pool=cluster"], "synth.pool: 'cluster' is not one of"),
    (["algo.val_every=-1"], "algo.val_every: must be >= 0, got -1"),
    (["algo.val_samples=0"], "algo.val_samples: must be >= 1, got 0"),
    (["data.val_fraction=0"], "algo.val_every=5 needs a validation split: data.val_fraction must be > 0, got 0"),
    (["algo.val_every=0"], "checkpoint.keep_best=true needs validation during GRPO: set algo.val_every > 0"),
])
def test_cross_field_rules(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert expected in str(e.value)


def test_every_choice_key_is_validated_from_its_schema_declaration():
    from dataclasses import fields, is_dataclass

    from kardia_rl.config.schema import KardiaConfig

    def choice_keys(obj, prefix=""):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                yield from choice_keys(value, f"{prefix}{f.name}.")
            elif "choices" in f.metadata:
                yield f"{prefix}{f.name}", f.metadata["choices"]

    keys = dict(choice_keys(KardiaConfig()))
    docs = {key: doc for key, _, doc in documented_fields()}
    assert {"rollout.engine", "judge.backend", "judge.fallback", "algo.preset", "algo.loss_agg"} <= set(keys)
    for key, choices in keys.items():
        assert all(c in docs[key] for c in choices if c), key  # the key's doc names every choice
        with pytest.raises(ConfigError, match=re.escape(f"{key}: 'bogus' is not one of {list(choices)}")):
            load_config(TINY, [f"{key}=bogus"])


@pytest.mark.parametrize("preset, expected", [
    ("grpo", dict(advantage="grpo", loss_agg="token_mean", clip_eps_high=0.0, drop_zero_std=False, overlong="keep")),
    ("drgrpo", dict(advantage="drgrpo", loss_agg="seq_mean_token_sum_norm", clip_eps_high=0.0, drop_zero_std=False,
                    overlong="keep")),
    ("dapo", dict(advantage="grpo", loss_agg="token_mean", clip_eps_high=0.28, drop_zero_std=True,
                  overlong="penalty")),
])
def test_algo_preset_sets_every_governed_key(preset, expected):
    cfg = load_config(TINY, [f"algo.preset={preset}"])
    assert {k: getattr(cfg.algo, k) for k in expected} == expected
    assert from_dict(to_dict(cfg)) == cfg  # resolved once; actors rebuilding the config get the same values


def test_algo_preset_explicit_key_wins_and_unset_keys_follow():
    cfg = load_config(TINY, ["algo.preset=dapo", "algo.overlong=filter", "algo.clip_eps_high=0.3"])
    assert (cfg.algo.overlong, cfg.algo.clip_eps_high, cfg.algo.drop_zero_std) == ("filter", 0.3, True)
    # cluster.yaml does not list the governed keys: the preset still fills them
    cluster = load_config(os.path.join(ROOT, "conf", "cluster.yaml"), ["algo.preset=drgrpo"])
    assert (cluster.algo.advantage, cluster.algo.loss_agg) == ("drgrpo", "seq_mean_token_sum_norm")


def test_kl_estimator_default_depends_on_placement():
    assert load_config(TINY, ["algo.kl_in=loss"]).algo.kl_estimator == "k3"
    assert load_config(TINY, ["algo.kl_in=reward"]).algo.kl_estimator == "k1"  # k3's reward gradient is biased
    assert load_config(TINY, ["algo.kl_in=reward", "algo.kl_estimator=k2"]).algo.kl_estimator == "k2"


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "algo: [unclosed\n"))


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    p = _write(tmp_path, "algo:\n  grop_size: 8\n")
    out = subprocess.run([sys.executable, "-m", "kardia_rl.cli", "config", "show", p, "rollout.top_p=2"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"{p}:2: algo.grop_size: unknown key (did you mean 'group_size'?)" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "kardia_rl.cli", "config", "show", TINY, "algo.group_size=4"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "group_size: 4" in ok.stdout


def test_cluster_config_is_valid():
    cfg = load_config(os.path.join(ROOT, "conf", "cluster.yaml"))
    gpus = (cfg.rollout.num_actors * cfg.rollout.gpus_per_actor + cfg.judge.num_actors * cfg.judge.gpus_per_actor
            + cfg.learner.num_workers * cfg.learner.gpus_per_worker)
    assert gpus == 8 and cfg.model.path == "Qwen/Qwen2.5-7B-Instruct" and cfg.judge.model == "Qwen/Qwen3-8B"


def test_renamed_key_is_read_under_its_new_name_and_reported(tmp_path, capsys):
    p = _write(tmp_path, "judge:\n  kv_cache_memory_bytes: 268435456\n")
    assert load_config(p).judge.kv_cache_bytes == 1 << 28
    assert f"{p}:2: judge.kv_cache_memory_bytes: renamed judge.kv_cache_bytes" in capsys.readouterr().err
    assert load_config(TINY, ["judge.kv_cache_memory_bytes=7"]).judge.kv_cache_bytes == 7
    assert "override 'judge.kv_cache_memory_bytes=7'" in capsys.readouterr().err
    saved = to_dict(load_config(TINY))  # a checkpoint's config from before the rename
    saved["judge"]["kv_cache_memory_bytes"] = saved["judge"].pop("kv_cache_bytes") + 5
    assert from_dict(saved).judge.kv_cache_bytes == 5 and "kv_cache_memory_bytes" in saved["judge"]
    both = _write(tmp_path, "judge:\n  kv_cache_memory_bytes: 1\n  kv_cache_bytes: 2\n")
    with pytest.raises(ConfigError, match="renamed judge.kv_cache_bytes, which is also set"):
        load_config(both)


def test_hardware_defaults_have_one_definition():
    import torch

    from kardia_rl.engines.base import resolve_dtype
    from kardia_rl.learner.ds_config import torch_dtype
    from kardia_rl.plan_estimate import dtype_bytes
    from kardia_rl.utils.hardware import CPU_KV_CACHE_BYTES, auto_dtype

    for gpu, name in ((True, "bfloat16"), (False, "float32")):
        assert auto_dtype("auto", gpu) == resolve_dtype("auto", gpu) == name
        assert torch_dtype("auto", gpu) == getattr(torch, name)
        assert dtype_bytes("auto", gpu) == torch.empty(0, dtype=getattr(torch, name)).element_size()
    assert auto_dtype("bfloat16", False) == "bfloat16" and auto_dtype("float32", True) == "float32"
    assert CPU_KV_CACHE_BYTES == 1 << 30  # what engine_kwargs gives a CPU engine for 0 (test_plan checks that)


@pytest.mark.parametrize("overrides, beta_loss, in_reward, reference, copy", [
    ([], 0.001, False, True, True),
    (["algo.kl_in=reward"], 0.0, True, True, True),
    (["algo.kl_beta=0"], 0.0, False, False, False),
    (["algo.kl_in=reward", "algo.kl_beta=0"], 0.0, False, False, False),
    (["model.lora.enabled=true"], 0.001, False, True, False),  # LoRA: the base with the adapter off, no copy
])
def test_loss_spec_places_the_kl_and_says_what_reference_it_needs(overrides, beta_loss, in_reward, reference, copy):
    from kardia_rl.config.specs import LossSpec, OptimSpec

    cfg = load_config(TINY, ["rollout.temperature=0.9", "model.max_new_tokens=77", *overrides])
    spec = LossSpec.from_config(cfg)
    assert (spec.beta_in_loss, spec.kl_in_reward, spec.reference, spec.reference_copy) == \
        (beta_loss, in_reward, reference, copy)
    assert (spec.temperature, spec.max_new_tokens) == (0.9, 77)
    assert spec.kl_estimator == ("k1" if "algo.kl_in=reward" in overrides else "k3")  # resolved by the preset
    assert OptimSpec.grpo(cfg).reference == reference and not OptimSpec.sft(cfg).reference


def test_every_bounded_key_names_itself_and_its_bound():
    """Bounds stand beside their keys in schema.py; a value just outside each one is refused naming the key and
    the bound (and nothing crashes on it, e.g. a zero batch size in the divisibility rules)."""
    from kardia_rl.config.validate import _declared

    bounded = {key: meta["bounds"] for key, _, meta in _declared(load_config(TINY)) if "bounds" in meta}
    assert {"algo.group_size", "rollout.temperature", "algo.clip_eps", "learner.zero_stage", "split.tau",
            "synth.min_user_safety", "judge.kv_cache_bytes"} <= set(bounded)
    want = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "lt": "< {}"}
    for key, bounds in bounded.items():
        for name, b in bounds.items():
            bad = {"ge": b - 1, "gt": b, "le": b + 1, "lt": b}[name]
            rule = f"in {'[' if 'ge' in bounds else '('}" if len(bounds) == 2 else want[name].format(b)
            with pytest.raises(ConfigError, match=re.escape(f"{key}: must be {rule}")) as e:
                load_config(TINY, [f"{key}={bad}"])
            assert f"got {bad}" in str(e.value), (key, str(e.value))
    with pytest.raises(ConfigError, match=re.escape("algo.clip_eps: must be in [0, 1), got 1")):
        load_config(TINY, ["algo.clip_eps=1"])
    with pytest.raises(ConfigError, match=re.escape("judge.dtype: 'fp32' is not one of ['auto', 'float32', 'bfloat16']")):
        load_config(TINY, ["judge.dtype=fp32"])
