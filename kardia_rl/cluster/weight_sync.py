"""Learner -> rollout weight sync, verified against the learner, with a timeout on every wait.

Transport (rollout.weight_sync):
- collective (the default for the vLLM engine): learner rank 0 streams the weights in fixed-size buckets
  over one collective group spanning itself and every engine worker (gloo on CPU, NCCL on GPU), through
  vLLM's native weight-transfer API (engines/vllm_weight_transfer.py, vllm_weight_sender.py). Nothing of
  model size passes through the driver or the object store; under ZeRO-3 the learner gathers one bucket at a
  time; LoRA is merged.
- object_store (the fallback, and the default for the hf engine, which cannot join the group): the full
  state dict goes learner -> object store -> every actor, as before this module existed.

Integrity (collective path, every sync, exact in any dtype; engines/vllm_weight_sender.py): each bucket's
digest travels with it and is compared by every receiver before loading; at finish, a layer that got none or
part of its weights stops the run; a rotating sample of engine parameters, hashed on the engine as loaded, is
compared with the learner's tensors. Any mismatch is a KardiaError naming the bucket or parameter (exit 2).

Verification (every rollout.verify_every syncs, the end-to-end check): each engine scores a fixed probe;
learner rank 0 scores the same probe with its own forward; see engines/verify.py for the dtype-aware tolerance.

Never hang: the engines' RPCs run with rollout.sync_timeout_s, the group's collectives too; a dead or stuck
engine is reported by its actor index.

A rollout actor replaced mid-step (rollout_group.RolloutGroup.restart) gets the learner's current weights through
`rejoin`: a gloo/NCCL group cannot take in a new member, and every rank of a group must (re)initialise together, so
the whole group is torn down and built again (learner rank 0 and every engine, the new one in its old rank), then
one full sync and a verification. The learner's weights are the ones the engines generated this step with (the
update comes after generation), so the new engine continues exactly where the old one was.
"""
from __future__ import annotations

from typing import Any

import ray

from kardia_rl.errors import KardiaError


class RolloutSyncClient:
    """vLLM's trainer-side client protocol (four calls) over the rollout actors, used on learner rank 0.

    Engine i's workers get ranks 1 + i * W .. (i + 1) * W of the group, W = workers per engine (its tensor-
    parallel size); vLLM's built-in Ray client would give every engine the same ranks.
    """

    def __init__(self, handles: list, timeout_s: float, workers_per_engine: int = 1):
        self.handles, self.timeout_s, self.workers = list(handles), float(timeout_s), int(workers_per_engine)

    def _all(self, phase: str, payloads: list) -> list:
        refs = [h.weight_transfer.remote(phase, p) for h, p in zip(self.handles, payloads)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        problems, results = [], []
        for i, ref in enumerate(refs):
            if ref not in ready:
                problems.append(f"rollout actor {i} did not finish within rollout.sync_timeout_s={self.timeout_s:g}s")
                continue
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                problems.append(f"rollout actor {i} is dead ({type(e).__name__})")
            except Exception as e:  # noqa: BLE001  the engine's own error, reported with its actor index
                # Ray wraps the engine's exception (traceback included): its own message is the line to show
                cause = str(getattr(e, "cause", None) or e).strip().splitlines() or [type(e).__name__]
                problems.append(f"rollout actor {i} failed: {cause[-1][:600]}")
        if problems:
            raise KardiaError(f"weight sync phase {phase!r}: " + "; ".join(problems))
        return results

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("init", [{**init_info, "rank": 1 + i * self.workers} for i in range(len(self.handles))])

    def start_weight_update(self) -> None:
        self._all("start", [None] * len(self.handles))

    def update_weights(self, update_info: Any) -> None:
        self._all("update", [update_info] * len(self.handles))

    def finish_weight_update(self, weight_version: Any = None) -> None:
        self._all("finish", [None] * len(self.handles))

    # The read-back check (engines/vllm_weight_transfer.py): not part of vLLM's protocol.
    def describe_params(self) -> list[dict]:
        """The parameters engine 0 can hash (every engine runs the same model)."""
        return self._all("describe", [None])[0] if self.handles else []

    def check_results(self) -> list[dict]:
        """Each engine's digests of this sync's sampled parameters, in actor order."""
        return self._all("check", [None] * len(self.handles))


def init_trainer_sync(learner, rank: int, handles: list, host: str, port: int, bucket_bytes: int, timeout_s: float,
                      fix_tied: bool = True, workers_per_engine: int = 1):
    """Inside a learner rank: the trainer-side engine of the collective sync (rank 0 is the sender)."""
    from kardia_rl.engines.vllm_weight_sender import KardiaTrainerInitInfo, trainer_init

    info = KardiaTrainerInitInfo(rank=rank, master_address=host, master_port=port,
                                 world_size=1 + len(handles) * workers_per_engine, bucket_bytes=bucket_bytes,
                                 timeout_s=timeout_s, device=str(learner.device), fix_tied=fix_tied)
    return trainer_init(info, RolloutSyncClient(handles, timeout_s, workers_per_engine), learner.weight_metadata,
                        lambda: learner.iter_weights(bucket_bytes))


class WeightSync:
    """The driver's view: one `sync(version)` call moves the weights and (when due) verifies them."""

    def __init__(self, cfg, learner, rollout, probe: list[int], fix_tied: bool = True):
        from kardia_rl.engines.base import resolve_dtype

        r = cfg.rollout
        self.cfg, self.learner, self.rollout, self.probe = cfg, learner, rollout, list(probe)
        self.collective = r.weight_sync == "collective" or (r.weight_sync == "auto" and r.engine == "vllm")
        self.engine_dtype = resolve_dtype(cfg.model.dtype, on_gpu=r.gpus_per_actor > 0)
        self.fix_tied, self.syncs, self.version = fix_tied, 0, "initial"
        self.group_open = False  # False after a failed send: learner rank 0 closed it (LearnerActor._close_sync)
        if self.collective:
            self._init_group()

    def _init_group(self) -> None:
        """(Re)build the collective group over learner rank 0 and the rollout actors as they are now."""
        r = self.cfg.rollout
        self.learner.init_weight_sync(self.rollout.actors, r.sync_bucket_mb << 20, r.sync_timeout_s, self.fix_tied,
                                      workers_per_engine=max(1, int(r.gpus_per_actor)))  # = TP size
        self.group_open = True

    def sync(self, version: str) -> dict:
        """Move the learner's weights into every engine; returns metrics (verification ones when due)."""
        if self.collective:
            if not self.group_open:  # the last send failed (e.g. an integrity check) and closed the group
                self._init_group()
            out = self._send(version)
            metrics = {"rollout/sync_bytes": out["bytes"],
                       "perf/weight_sync_gb_per_s": out["bytes"] / 1e9 / max(out["seconds"], 1e-9),
                       "rollout/sync_params_read_back": out.get("check_params", 0),
                       # seconds spent on the integrity digests inside the sync, learner rank 0 and slowest engine
                       "timing/sync_check_learner": out.get("check_learner_s", 0.0),
                       "timing/sync_check_engine": out.get("check_engine_s", 0.0)}
        else:
            self.rollout.load_state_dict(self.learner.hf_state_dict())
            metrics = {}
        every, n = self.cfg.rollout.verify_every, self.syncs + 1
        if every and n % every == 0:
            metrics.update(self.verify())
        # counted once it succeeded: a sync run again after a rollout actor was replaced is the same sync
        self.syncs, self.version = n, version
        return metrics

    def rejoin(self, indices: list[int]) -> dict:
        """Rollout actors `indices` were replaced: give them the learner's current weights and verify every engine
        (whatever rollout.verify_every says: a new engine is never trusted unchecked). Returns the check's metrics."""
        if self.collective:
            self._init_group()  # every rank re-initialises together (see the module docstring)
            self._send(self.version)  # the surviving engines receive the same bytes again
        else:
            self.rollout.load_state_dict(self.learner.hf_state_dict(), indices=list(indices))
        return self.verify()

    def _send(self, version: str) -> dict:
        self.group_open = False  # until it succeeds: a failed send closes the group in learner rank 0
        try:
            out = self.learner.send_weights(version)
        except KardiaError as e:  # raised in learner rank 0: the user gets its one line, not Ray's traceback
            raise KardiaError(str(getattr(e, "cause", None) or e)) from None
        self.group_open = True
        return out

    def verify(self) -> dict:
        from kardia_rl.engines.verify import check_sync

        r = self.cfg.rollout
        engines = self.rollout.probe_logprobs(self.probe, timeout_s=r.sync_timeout_s)
        learner = self.learner.probe_logprobs(self.probe)
        return check_sync(engines, learner, self.engine_dtype, max_fp32=r.sync_check_threshold,
                          mean_low_precision=r.sync_check_mean_low_precision)
