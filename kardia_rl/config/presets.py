"""GRPO algorithm presets: one name for a coherent set of choices, so no method is run half-configured.

Dr. GRPO, for instance, is two changes together (no std in the advantage AND a constant loss normaliser);
taking only the first one silently runs neither paper's method. So `algo.preset` names the method and fills
every key it governs that the config leaves unset ("" for strings, null for `drop_zero_std`, 0 for
`clip_eps_high`). An explicit value still wins; validate.py then rejects the combinations that make a
half-setting (drgrpo advantage without the matching aggregation, or the other way round).

    preset   advantage  loss_agg                 clip_eps_high    drop_zero_std  overlong
    grpo     grpo       token_mean               = clip_eps       false          keep
    drgrpo   drgrpo     seq_mean_token_sum_norm  = clip_eps       false          keep
    dapo     grpo       token_mean               0.28             true           penalty

`grpo` is GRPO as the peers converge on it (std-normalised advantage, token-mean loss: verl's default
`token-mean`, TRL's default `loss_type`); the original GRPO paper averaged per sequence first, which is
`loss_agg=seq_mean_token_mean`. `dapo` takes DAPO's clip-higher (0.28), its zero-variance group filter
(without the re-sampling that refills the batch) and its soft overlong penalty; the KL term is left to
`algo.kl_beta` (DAPO drops it, Kardia-R1 keeps it).

Pure Python on the config object (no torch import): it runs inside `load_config`, before validation.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "grpo": {"advantage": "grpo", "loss_agg": "token_mean", "clip_eps_high": 0.0, "drop_zero_std": False,
             "overlong": "keep"},
    "drgrpo": {"advantage": "drgrpo", "loss_agg": "seq_mean_token_sum_norm", "clip_eps_high": 0.0,
               "drop_zero_std": False, "overlong": "keep"},
    "dapo": {"advantage": "grpo", "loss_agg": "token_mean", "clip_eps_high": 0.28, "drop_zero_std": True,
             "overlong": "penalty"},
}

#: The value of each governed key that means "not set: take the preset's".
UNSET = {"advantage": "", "loss_agg": "", "clip_eps_high": 0.0, "drop_zero_std": None, "overlong": ""}

#: Default KL estimator by placement. In the loss, k3 (GRPO/TRL/verl). In the reward, k1: the reward only
#: reaches the policy through the score function, and E[grad log pi * sum k1] is exactly the gradient of
#: KL(pi || ref); with k3 (or k2) the same product misses the estimator's own dependence on pi, so the
#: penalty pushes in a biased direction even though k3's VALUE is an unbiased KL estimate.
KL_ESTIMATOR_BY_PLACEMENT = {"loss": "k3", "reward": "k1"}


def resolve_algo(cfg) -> object:
    """Fill the preset-governed keys of `cfg.algo` left unset, and the placement's KL estimator; in place.

    Idempotent (a resolved config has no unset keys left), so configs rebuilt from a saved dict resolve to
    the same values. An unknown preset is left for validate.py to report.
    """
    ac = cfg.algo
    preset = PRESETS.get(ac.preset)
    if preset is not None:
        for key, unset in UNSET.items():
            if getattr(ac, key) == unset:
                setattr(ac, key, preset[key])
    if ac.kl_estimator == "" and ac.kl_in in KL_ESTIMATOR_BY_PLACEMENT:
        ac.kl_estimator = KL_ESTIMATOR_BY_PLACEMENT[ac.kl_in]
    return cfg
