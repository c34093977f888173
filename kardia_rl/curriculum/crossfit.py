"""Cross-fitted warm-up reference for the difficulty split (split.reference=warmup).

Why: a warm-up policy trained on every training turn and then asked to answer those same turns rates
memorisation, not difficulty ("hard" = "not learnt by heart after E epochs"). Cross-fitting removes the leak:
the training samples fall into K = split.folds folds by dialogue (by profile when data.split_by=profile, so
a profile's other dialogues do not leak either); warm-up i trains on the other K-1 folds and rates only
fold i, so every resolution rate comes from a policy that never saw the sample's dialogue (or profile).
Each warm-up validates on its held-out fold, so sft_result.json carries a true held-out loss.

Cost: K warm-ups of (K-1)/K of the data each, i.e. K-1 times the SFT steps of one in-sample warm-up at the
same epochs, plus one rollout-group start per fold (one judge pool serves every fold); generation and scoring
stay one pass over the samples.

Fold models live in WORK_DIR/fold{i}/ with fold.json (the grouping keys it trained on and its epochs); a
re-run reuses a fold model only when fold.json matches, so an interrupted split continues without retraining.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from kardia_rl.data import TurnSample
from kardia_rl.errors import KardiaError
from kardia_rl.utils.io import atomic_write_text
from kardia_rl.utils.seeds import derive_seed


def fold_key(sample: TurnSample, by: str) -> str:
    """The unit that never straddles folds: the dialogue, or the profile (anon_username)."""
    return sample.dialogue_id if by == "dialogue" else sample.anon_username


def assign_folds(samples: Sequence[TurnSample], k: int, by: str, seed: int) -> dict[str, int]:
    """Grouping key -> fold in [0, k): keys in seeded-hash order (independent of file order), each to the fold
    with the fewest samples so far, so folds hold about the same number of turns."""
    counts: dict[str, int] = {}
    for s in samples:
        key = fold_key(s, by)
        counts[key] = counts.get(key, 0) + 1
    if len(counts) < k:
        raise KardiaError(f"split.folds = {k} needs at least {k} {by}s in the training data, found {len(counts)}; "
                          f"lower split.folds or set split.reference=base")
    order = sorted(counts, key=lambda key: derive_seed(seed, "fold", key, scheme="unit256"))
    sizes = [0] * k
    folds: dict[str, int] = {}
    for key in order:
        f = min(range(k), key=lambda i: (sizes[i], i))
        folds[key] = f
        sizes[f] += counts[key]
    return folds


def _fold_ready(fold_dir: str, spec: dict) -> bool:
    try:
        with open(os.path.join(fold_dir, "fold.json")) as f:
            same = json.load(f) == spec
    except (OSError, ValueError):
        return False
    return same and os.path.exists(os.path.join(fold_dir, "sft_result.json"))


def crossfit_rewards(cfg, samples: Sequence[TurnSample], work_dir: str, *, progress: bool = True,
                     pools=None) -> tuple[dict, dict]:
    """(id -> k rewards, in the order of `samples`; info for split.json) from K cross-fitted warm-ups.

    `pools` (cluster.stage_pools.StagePools): fold i is rated on a rollout group for fold i's model, every fold
    on the one judge pool; the caller's pools are left open, this call's own are released when it returns."""
    from kardia_rl.cluster.learner_group import run_sft_on_group
    from kardia_rl.cluster.stage_pools import StagePools
    from kardia_rl.curriculum import rating

    k, by, epochs = cfg.split.folds, cfg.data.split_by, cfg.split.warmup_epochs
    folds = assign_folds(samples, k, by, cfg.seed)
    warm_cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, epochs=epochs))
    own = pools is None
    rewards: dict[str, list[float]] = {}
    info: list[dict] = []
    held = [[s for s in samples if folds[fold_key(s, by)] == i] for i in range(k)]
    dirs = [os.path.join(work_dir, f"fold{i}") for i in range(k)]
    try:
        # Every warm-up first, then every rating pass: the learner group holds its GPUs only while it trains, and
        # the rating pools (a rollout group per fold model, one judge pool for all folds) start after the last
        # warm-up released them, so the two never compete for the same GPUs.
        for i in range(k):
            train = [s for s in samples if folds[fold_key(s, by)] != i]
            spec = {"fold": i, "folds": k, "by": by, "epochs": epochs, "seed": cfg.seed,
                    "trained_on": sorted({fold_key(s, by) for s in train})}
            if not _fold_ready(dirs[i], spec):
                if progress:
                    print(f"[split] fold {i + 1}/{k}: warm-up SFT for {epochs:g} epochs on {len(train)} turns; "
                          f"it will rate the {len(held[i])} held-out turns", flush=True)
                # on the learner group (learner.num_workers Ray ranks, ZeRO), like the pipeline's SFT stage
                run_sft_on_group(warm_cfg, dirs[i], train, held[i], generate_eval=False, progress=progress)
                atomic_write_text(os.path.join(dirs[i], "fold.json"), json.dumps(spec, indent=1))
        if own:
            pools = StagePools(cfg, "split")
        for i in range(k):
            got, timing = rating.sample_rewards(cfg, held[i], dirs[i], progress=progress, pools=pools)
            rewards.update(got)
            with open(os.path.join(dirs[i], "sft_result.json")) as f:
                trained = json.load(f)
            rates = rating.rates_from_rewards(got, cfg.split.reward_threshold)
            info.append({"fold": i, "model": dirs[i], "trained_turns": len(samples) - len(held[i]),
                         "rated_turns": len(held[i]), "rate_mean": sum(rates.values()) / max(1, len(rates)),
                         f"rated_{by}s": sorted({fold_key(s, by) for s in held[i]}),
                         "heldout_val_loss": trained.get("val_loss_final"), "timing": timing})
    finally:
        if own and pools is not None:
            pools.close()
    return {s.id: rewards[s.id] for s in samples}, {"folds": k, "fold_by": by, "warmup_epochs": epochs,
                                                     "fold_models": info}
