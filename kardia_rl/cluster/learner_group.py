"""The learner group: W DeepSpeed data-parallel ranks as Ray actors, with the reference model fused in.

Ranks are placed by a placement group (`ray.placement_strategy`, one bundle per rank). Rank 0 reports its
node address and a free port, then every rank initialises the process group (gloo on CPU, NCCL on GPU)
concurrently — `init_process_group` blocks until all ranks join, so construction and set-up are separate
calls. Each step the driver hands every rank its contiguous share of the rollout batch; the learner
all-reduces token counts and metrics itself, so the loss is the global token mean whatever W is.
Collective operations (export under ZeRO-3, checkpoints) are called on all ranks; rank 0's result is used.

The same group runs SFT (role "sft": the pipeline's SFT stage and the split's warm-ups, `run_sft_on_group`):
same placement, same ZeRO stage, W = learner.num_workers ranks; there the learner is built inside
`learner.sft.run_sft` on every rank, because its LR schedule needs the step count of the data plan.
"""
from __future__ import annotations

import os
from typing import Optional

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from kardia_rl.config import from_dict, to_dict


@ray.remote
class LearnerActor:
    def __init__(self, cfg_dict: dict, model_path: str, rank: int, world_size: int):
        self.cfg, self.model_path, self.rank, self.world_size = from_dict(cfg_dict), model_path, rank, world_size
        self.learner = None

    def address(self) -> tuple[str, int]:
        from kardia_rl.learner.distributed import free_port

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def _prepare(self, master_addr: str) -> None:
        os.environ["MASTER_ADDR"] = master_addr
        if self.cfg.learner.cpu_threads > 0:
            # Ray gives actors that reserve < 1 CPU a single thread; the learner may use more while the
            # rollout and judge actors idle during the update.
            import torch

            torch.set_num_threads(self.cfg.learner.cpu_threads)

    def setup(self, master_addr: str, master_port: int) -> int:
        from kardia_rl.learner.deepspeed_learner import DeepSpeedLearner

        self._prepare(master_addr)
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so the local device is always index 0.
        self.learner = DeepSpeedLearner(self.cfg, self.model_path, rank=self.rank, world_size=self.world_size,
                                        local_rank=0, master_port=master_port)
        return self.rank

    def run_sft(self, master_addr: str, master_port: int, out_dir: str, train_samples: list, val_samples: list,
                progress: bool) -> dict:
        """The whole SFT run on this rank (collective: every rank of the group calls it at once)."""
        from kardia_rl.learner.sft import run_sft

        self._prepare(master_addr)
        return run_sft(self.cfg, out_dir, train_samples=train_samples, val_samples=val_samples, rank=self.rank,
                       world_size=self.world_size, local_rank=0, master_port=master_port,
                       progress=progress and self.rank == 0)

    def train_step(self, batch: dict) -> dict:
        return self.learner.train_step(batch)

    def compute_logprobs(self, batch: dict, which: str):
        return self.learner.compute_logprobs(batch, which)

    def hf_state_dict(self) -> Optional[dict]:
        # collective under ZeRO-3; only rank 0 keeps a copy (the others only join the gathers)
        sd = self.learner.hf_state_dict(keep=self.rank == 0)
        return sd if self.rank == 0 else None

    def init_weight_sync(self, rollout_handles: list, host: str, port: int, bucket_bytes: int, timeout_s: float,
                         fix_tied: bool = True, workers_per_engine: int = 1) -> int:
        """Join the weight-transfer group (rank 0 hosts it and drives the engines; see cluster.weight_sync)."""
        from kardia_rl.cluster.weight_sync import init_trainer_sync

        self._close_sync()  # a rebuild after a rollout actor died
        self.sync = init_trainer_sync(self.learner, self.rank, rollout_handles, host, port, bucket_bytes, timeout_s,
                                      fix_tied, workers_per_engine)
        return self.rank

    def send_weights(self, version: str) -> dict:
        """One collective sync (every rank: ZeRO-3 gathers are collective); rank 0's numbers count."""
        import time

        t0 = time.perf_counter()
        try:
            sent = self.sync.send_weights(version)
        except Exception as e:  # an engine died: close the group now (see _close_sync), then report
            failed = e.with_traceback(None)  # its frames hold the group's buffers and work handles
        else:
            check = getattr(self.sync, "last_check", {})  # the integrity checks' own cost (bench_weight_sync)
            return {"bytes": float(sent), "seconds": time.perf_counter() - t0,
                    **{f"check_{k}": float(v) for k, v in check.items()}}
        self._close_sync()
        raise failed

    def _close_sync(self) -> None:
        """Drop the weight-transfer group: the engines still waiting in one of its collectives get an error now
        (their peer closed), instead of at rollout.sync_timeout_s, and can join the rebuilt group at once."""
        import gc

        old, self.sync = getattr(self, "sync", None), None
        if old is not None:
            old.shutdown()
            del old
            gc.collect()

    def probe_logprobs(self, probe_ids: list[int]) -> list[float]:
        return self.learner.probe_logprobs(probe_ids)  # collective under ZeRO-3

    def save_checkpoint(self, path: str) -> dict:
        """Save (collective), then hash this rank's share of the written files, read back from disk: the ranks
        hash in parallel, each about 1/W of the checkpoint, and the driver hashes none of it."""
        from kardia_rl.cluster.checkpoint import hash_files, rank_share

        self.learner.save_checkpoint(path)  # ends with a barrier: every rank's files are on disk
        return hash_files(path, rank_share(path, self.rank, self.world_size))

    def load_checkpoint(self, path: str) -> dict:
        return self.learner.load_checkpoint(path)

    def save_pretrained(self, path: str) -> str:
        return self.learner.save_pretrained(path)


class LearnerGroup:
    def __init__(self, cfg, model_path: str, cpus_per_actor: float = 0.0, role: str = "policy"):
        lc = cfg.learner
        self.world_size = lc.num_workers
        # A bundle must reserve something: a token CPU share keeps CPU-only runs schedulable on 2 cores.
        bundle = {"CPU": max(cpus_per_actor, 0.01)}
        if lc.gpus_per_worker:
            bundle["GPU"] = lc.gpus_per_worker
        self.pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy=cfg.ray.placement_strategy)
        ray.get(self.pg.ready())
        d = to_dict(cfg)
        self.actors = [
            LearnerActor.options(
                num_cpus=bundle["CPU"], num_gpus=lc.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                     placement_group_bundle_index=r),
            ).remote(d, model_path, r, self.world_size)
            for r in range(self.world_size)]
        if role == "policy":  # the SFT role builds its learners inside run_sft
            addr, port = ray.get(self.actors[0].address.remote())
            ray.get([a.setup.remote(addr, port) for a in self.actors])

    def run_sft(self, out_dir: str, train_samples: list, val_samples: list, progress: bool = True) -> dict:
        addr, port = ray.get(self.actors[0].address.remote())
        refs = [a.run_sft.remote(addr, port, out_dir, list(train_samples), list(val_samples), progress)
                for a in self.actors]
        return ray.get(refs)[0]  # rank 0 wrote the model and sft_result.json

    def _shards(self, batch: dict) -> list[dict]:
        from kardia_rl.learner.batching import shard_rows

        return [shard_rows(batch, r, self.world_size) for r in range(self.world_size)]

    def train_step(self, batch: dict) -> dict:
        results = ray.get([a.train_step.remote(s) for a, s in zip(self.actors, self._shards(batch))])
        return results[0]  # metrics are already all-reduced across ranks

    def compute_logprobs(self, batch: dict, which: str):
        import torch

        parts = ray.get([a.compute_logprobs.remote(s, which) for a, s in zip(self.actors, self._shards(batch))])
        width = max(p.shape[1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

    def hf_state_dict(self) -> dict:
        return ray.get([a.hf_state_dict.remote() for a in self.actors])[0]

    def init_weight_sync(self, rollout_handles: list, bucket_bytes: int, timeout_s: float, fix_tied: bool = True,
                         workers_per_engine: int = 1):
        host, port = ray.get(self.actors[0].address.remote())
        ray.get([a.init_weight_sync.remote(rollout_handles, host, port, bucket_bytes, timeout_s, fix_tied,
                                           workers_per_engine) for a in self.actors])

    def send_weights(self, version: str) -> dict:
        return ray.get([a.send_weights.remote(version) for a in self.actors])[0]

    def probe_logprobs(self, probe_ids: list[int]) -> list[float]:
        return ray.get([a.probe_logprobs.remote(list(probe_ids)) for a in self.actors])[0]

    def save_checkpoint(self, path: str) -> dict:
        """{path relative to `path`: {size, blake2b}} of every file the ranks wrote, each hashed by one rank."""
        files: dict = {}
        for share in ray.get([a.save_checkpoint.remote(path) for a in self.actors]):
            files.update(share)
        return files

    def load_checkpoint(self, path: str) -> None:
        ray.get([a.load_checkpoint.remote(path) for a in self.actors])

    def save_pretrained(self, path: str) -> str:
        ray.get([a.save_pretrained.remote(path) for a in self.actors])
        return path

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)


def run_sft_on_group(cfg, out_dir: str, train_samples, val_samples, *, generate_eval: bool = True,
                     eval_before: bool = False, progress: bool = True) -> dict:
    """SFT with learner.num_workers Ray ranks (ZeRO stage, placement and GPUs of the GRPO learner group), then
    (generate_eval) the format check on a rollout group (cluster.sft_check); eval_before: the same check on the
    untrained model first.

    Joins the cluster of ray.address / RAY_ADDRESS (else starts a local one). The model is prepared here first,
    once, so the ranks never race to build or prepare it. Both the validation loss and the check see the same
    capped sample (sft.max_val_samples, learner.sft.val_sample). One pool at a time: the check's engines start
    after the learner group is gone.
    """
    from dataclasses import replace

    from kardia_rl.learner.sft import ensure_model, val_sample
    from kardia_rl.cluster.ray_cluster import init_ray
    from kardia_rl.cluster.sft_check import add_format_check, format_check

    cfg = replace(cfg, model=replace(cfg.model, path=ensure_model(cfg)))
    if train_samples is None or val_samples is None:
        from kardia_rl.data.encoding import load_training_turns

        tr, va = load_training_turns(cfg)
        train_samples = tr if train_samples is None else train_samples
        val_samples = va if val_samples is None else val_samples
    init_ray(cfg.ray.address, cfg.ray.num_cpus, log_level=cfg.logging.engine_log_level)
    checked = val_sample(val_samples, cfg) if generate_eval else []
    before = format_check(cfg, cfg.model.path, checked) if eval_before and checked else None
    group = LearnerGroup(cfg, cfg.model.path, cfg.ray.cpus_per_actor, role="sft")
    try:
        result = group.run_sft(out_dir, train_samples, val_samples, progress=progress)
    finally:
        group.shutdown()
    return add_format_check(cfg, out_dir, result, checked, before) if checked else result
