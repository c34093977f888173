"""The rollout group: R Ray actors, each owning one generation engine (vLLM, or transformers).

Work goes to an idle actor, one generate call per actor at a time (never queued behind another). Weight sync
(trainer.weight_sync) streams the learner's weights into each engine over a collective group; the actors
expose its phases, the probe scoring that verifies it, and the object-store fallback for the hf engine.

A dead actor is replaced in place (`restart`: a new actor, same index and options), then brought to the current
weights by the caller's `reload` (trainer.weight_sync.WeightSync.rejoin) before its chunk is sent again.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Optional, Sequence

import ray

from kardia_rl.config import from_dict
from kardia_rl.trainer.balance import least_loaded

# Fault injection for tests/test_faults.py: if the file named here exists and holds N, the actor's N-th generate
# call deletes it and SIGKILLs its own process (consumed once, so the replacement runs normally). Unset in normal
# runs: one environment lookup per generate call.
KILL_FILE_ENV = "KARDIA_FAULT_ROLLOUT_KILL_FILE"


def _maybe_kill_self(calls: int) -> None:
    path = os.environ.get(KILL_FILE_ENV)
    if not path:
        return
    try:
        with open(path) as f:
            due = int(f.read().strip() or 0)
        if calls != due:
            return
        os.remove(path)
    except (FileNotFoundError, ValueError):
        return
    os.kill(os.getpid(), signal.SIGKILL)


@ray.remote
class RolloutActor:
    def __init__(self, cfg_dict: dict, model_path: str, index: int):
        from kardia_rl.engines import engine_from_config

        cfg = from_dict(cfg_dict)
        self.index, self.calls = index, 0
        # verified against the learner's own forward: no CPU model copy here
        self.engine = engine_from_config(cfg, model_path, seed_offset=index, verify_reference=False)

    def ready(self) -> int:
        return self.index

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, greedy: bool = False):
        self.calls += 1
        _maybe_kill_self(self.calls)
        return self.engine.generate(prompts, n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed, greedy=greedy)

    def load_weights(self, blob: bytes) -> float:
        """The fallback path (engines that cannot join the weight-transfer group): a full state dict."""
        from safetensors.torch import load as load_safetensors

        self.engine.load_state_dict(load_safetensors(blob))
        return float(getattr(self.engine, "last_sync_s", 0.0))

    def weight_transfer(self, phase: str, payload=None):
        """One phase of the collective sync (trainer.weight_sync drives it from learner rank 0); the read-back
        check's phases (describe, check) return the engine's answer."""
        out = self.engine.weight_transfer(phase, payload)
        return out if out is not None else float(getattr(self.engine, "last_sync_s", 0.0))

    def probe_logprobs(self, probe_ids: list[int]) -> list[float]:
        return self.engine.probe_logprobs(list(probe_ids))

    def shutdown(self) -> None:
        self.engine.shutdown()


class RolloutGroup:
    def __init__(self, cfg, model_path: str, cpus_per_actor: float = 0.0):
        from kardia_rl.config import to_dict

        self.cfg, self.model_path, self.cfg_dict = cfg, model_path, to_dict(cfg)
        self.opts = {"num_cpus": cpus_per_actor, "num_gpus": cfg.rollout.gpus_per_actor}
        self.actors = [self._start(i) for i in range(cfg.rollout.num_actors)]
        self.outstanding = [0] * len(self.actors)
        self.in_flight: dict[int, ray.ObjectRef] = {}  # actor index -> its generate call
        self._restart_lock = threading.Lock()
        ray.get([a.ready.remote() for a in self.actors])

    def _start(self, index: int):
        return RolloutActor.options(**self.opts).remote(self.cfg_dict, self.model_path, index)

    def submit(self, prompts: list[list[int]], n: int, *, seed: int, greedy: bool = False,
               temperature: Optional[float] = None, max_new_tokens: Optional[int] = None):
        """Send a chunk of prompts to an idle actor; returns (actor index, ObjectRef).

        Never a busy one: the actor is synchronous, so a second call would wait in its queue and the engine
        would batch each call's prompts alone (two half batches run one after the other). Callers submit at
        most one chunk per actor at a time (see rollout.generate_and_score).
        """
        i = least_loaded(self.outstanding)
        if self.outstanding[i]:
            raise RuntimeError(f"all {len(self.actors)} rollout actors are busy: submit at most one chunk per actor "
                               "at a time (a queued call would split the engine's batch)")
        self.outstanding[i] += 1
        r = self.cfg.rollout
        temperature = r.temperature if temperature is None else temperature  # an explicit 0.0 stays 0.0
        ref = self.actors[i].generate.remote(prompts, n, temperature, r.top_p,
                                             max_new_tokens or self.cfg.model.max_new_tokens, seed, greedy)
        self.in_flight[i] = ref
        return i, ref

    def done(self, index: int) -> None:
        self.outstanding[index] -= 1
        self.in_flight.pop(index, None)

    def restart(self, index: int, error: BaseException, reload: Callable[[int], object]) -> None:
        """Replace dead actor `index` by a new one (same index, options and engine seed), then `reload(index)` it.

        The reload rebuilds the weight-transfer group, whose collectives need every engine, so it waits until the
        other actors' generate calls are done (their results stay valid: they already had the current weights).
        One restart at a time: two actors dying together are replaced one after the other.
        """
        with self._restart_lock:
            print(f"[rollout] actor {index} died ({type(error).__name__}); starting a new one with the current "
                  "weights and sending its chunk again", file=sys.stderr, flush=True)
            ray.kill(self.actors[index])  # it may only be unreachable: never two engines for one index
            self.actors[index] = self._start(index)
            others = [ref for k, ref in list(self.in_flight.items()) if k != index]
            ray.get(self.actors[index].ready.remote())  # the engine starts while the others finish generating
            if others:
                ray.wait(others, num_returns=len(others))
            reload(index)

    def load_state_dict(self, state_dict: dict, indices: Optional[Sequence[int]] = None) -> None:
        """Fallback sync: the full state dict once through the object store (see trainer.weight_sync), into every
        actor or only `indices`."""
        from safetensors.torch import save as save_safetensors

        blob = ray.put(save_safetensors({k: v.contiguous() for k, v in state_dict.items()}))
        targets = self.actors if indices is None else [self.actors[i] for i in indices]
        ray.get([a.load_weights.remote(blob) for a in targets])

    def probe_logprobs(self, probe_ids: Sequence[int], timeout_s: Optional[float] = None) -> list[list[float]]:
        return ray.get([a.probe_logprobs.remote(list(probe_ids)) for a in self.actors], timeout=timeout_s)

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=60)
        except Exception:  # an engine that already died has nothing left to release
            pass
        for a in self.actors:
            ray.kill(a)
