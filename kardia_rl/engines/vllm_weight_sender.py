"""The learner's side of the "kardia" weight-transfer backend (see vllm_weight_transfer for the protocol and
the engine side): learner rank 0 packs the weights into buckets, each with its digest in a trailer, streams
them over the collective group while driving the engines' four phases, and then compares the engines' digests
of a rotating sample of parameters (hashed as loaded) with the tensors it sent.

Split from vllm_weight_transfer to keep each module small; like it, it touches vLLM's weight-transfer API and
is a place that breaks on vLLM upgrades.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import ClassVar, Iterator, Optional

import torch
from vllm.distributed.weight_transfer.base import (ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine,
                                                   WeightSource)
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from kardia_rl.engines.vllm_weight_transfer import (BACKEND, KardiaUpdateInfo, _broadcast, _process_group, framed,
                                                  plan_buckets)
from kardia_rl.engines.weight_digest import SampleRotation, digest, digest_concat
from kardia_rl.errors import KardiaError

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
        self.sample: Optional[SampleRotation] = None  # set by trainer_init from the engines' parameter layout
        self.layout: dict[str, dict] = {}
        self.last_check: dict = {}

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
        engine._plan_read_back(client.describe_params())
        return engine

    def _plan_read_back(self, layout: list[dict]) -> None:
        """Keep the engine parameters whose HF pieces the learner sends; anchors: first, last, an untied head."""
        sent = {m.name for m in self.source.metadata()}
        self.layout = {d["name"]: d for d in layout if all(p in sent for p in d["pieces"])}
        names = list(self.layout)
        anchors = names[:1] + names[-1:] + [n for n in names if n.rpartition(".")[0].endswith("lm_head")]
        self.sample = SampleRotation(names, anchors)

    def send_weights(self, version: Optional[str] = None) -> int:
        """One full sync; returns the bytes sent (0 on non-sender ranks). Called on every learner rank."""
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # join the ZeRO-3 gathers, nothing else
                pass
            return 0
        check = self.sample.next() if self.sample is not None else []
        info = KardiaUpdateInfo(names=[m.name for m in meta], dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                                shapes=[list(m.shape) for m in meta], bucket_bytes=self.info.bucket_bytes, check=check)
        wanted = {p: self.layout[n] for n in check for p in self.layout[n]["pieces"]}
        kept: dict[str, torch.Tensor] = {}
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            future = exe.submit(self.client.update_weights, asdict(info))
            sent = self._stream(meta, info, future, wanted, kept)
            future.result()  # the engines' own errors (the client bounds the wait)
        finally:
            exe.shutdown(wait=False)  # never join a thread blocked on a dead peer: the error must come out
        self.client.finish_weight_update(version)
        self._check(version, check, kept)
        return sent

    def _check(self, version: Optional[str], check: list[str], kept: dict) -> None:
        """Compare each engine's digests of the sampled parameters, as it loaded them, with the learner's."""
        t0 = time.perf_counter()
        ours = {}
        for name in check:
            d = self.layout[name]
            ours[name] = list(digest_concat([kept[p] for p in d["pieces"]], getattr(torch, d["dtype"]), d["rows"]))
        problems, results = [], self.client.check_results()
        for i, result in enumerate(results):
            if result["incomplete"]:
                problems.append(f"rollout actor {i}: engine layer(s) {', '.join(result['incomplete'][:4])}"
                                f"{' ...' if len(result['incomplete']) > 4 else ''} got none or only part of their "
                                "weights, so vLLM kept their previous ones")
            for name in check:
                theirs = result["digests"].get(name)
                if theirs is None:
                    problems.append(f"rollout actor {i}: engine parameter {name} was not reloaded in this sync")
                elif theirs != ours[name]:
                    problems.append(f"rollout actor {i}: engine parameter {name} differs from the learner's "
                                    f"{' + '.join(self.layout[name]['pieces'])} (digest {theirs} != {ours[name]})")
        self.last_check = {"params": len(check), "learner_s": time.perf_counter() - t0 + self._sender_check_s,
                           "engine_s": max([0.0] + [float(r["seconds"]) for r in results])}
        if problems:
            raise KardiaError(f"weight sync {version!r} read-back check failed: " + "; ".join(problems[:3])
                              + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else ""))

    def _stream(self, meta: list[ParamMeta], info: KardiaUpdateInfo, future, wanted: dict, kept: dict) -> int:
        buckets = plan_buckets(list(zip(info.names, info.dtype_names, info.shapes)), info.bucket_bytes)
        pairs = iter(self.source)
        pending, sent, index = None, 0, 0
        self._sender_check_s = 0.0
        for number, (size, items) in enumerate(buckets):
            start, total = framed(size)
            buf = torch.empty(total, dtype=torch.uint8, device=self.info.device)  # packed while the last one flies
            for name, dtype, shape, off, n in items:
                got_name, t = next(pairs)
                expected = meta[index]
                if got_name != expected.name or t.dtype != expected.dtype or tuple(t.shape) != expected.shape:
                    raise ValueError(f"weight source yielded {got_name!r} {t.dtype} {tuple(t.shape)} where its "
                                     f"metadata declared {expected.name!r} {expected.dtype} {expected.shape}")
                index += 1
                buf[off:off + n].copy_(t.detach().reshape(-1).view(torch.uint8))
                if got_name in wanted:  # cast as the engine's loader will (its parameter's dtype)
                    kept[got_name] = t.detach().to(getattr(torch, wanted[got_name]["dtype"]))
            t0 = time.perf_counter()
            trailer = torch.tensor([number, *digest(buf[:size])], dtype=torch.int64)
            buf[start:total].copy_(trailer.view(torch.uint8))
            self._sender_check_s += time.perf_counter() - t0
            if future.done():
                future.result()  # an engine already failed: stop before blocking on it
            if pending is not None:
                pending.wait()
            pending = _broadcast(self.pg, buf, self.info.timeout_s)
            sent += total
        if pending is not None:
            pending.wait()
        return sent

    def shutdown(self) -> None:
        self.pg = self.store = None



def register() -> None:
    """Register the trainer side with vLLM's factory (idempotent)."""
    try:
        WeightTransferTrainerFactory.register_engine(BACKEND, KardiaTrainerEngine)
    except ValueError:  # already registered in this process
        pass


def trainer_init(info: KardiaTrainerInitInfo, client, metadata_fn, iter_fn) -> KardiaTrainerEngine:
    """The learner's entry point: the trainer engine through vLLM's factory, over our weight source."""
    register()
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=FunctionSource(metadata_fn, iter_fn))
