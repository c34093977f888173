"""The rollout group: R Ray actors, each owning one generation engine (vLLM, or transformers).

Work goes to an idle actor, one generate call per actor at a time (never queued behind another). Weight sync
(trainer.weight_sync) streams the learner's weights into each engine over a collective group; the actors
expose its phases, the probe scoring that verifies it, and the object-store fallback for the hf engine.
"""
from __future__ import annotations

from typing import Optional, Sequence

import ray

from kardia_rl.config import from_dict
from kardia_rl.trainer.balance import least_loaded


@ray.remote
class RolloutActor:
    def __init__(self, cfg_dict: dict, model_path: str, index: int):
        from kardia_rl.engines import engine_from_config

        cfg = from_dict(cfg_dict)
        self.index = index
        # verified against the learner's own forward: no CPU model copy here
        self.engine = engine_from_config(cfg, model_path, seed_offset=index, verify_reference=False)

    def ready(self) -> int:
        return self.index

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, greedy: bool = False):
        return self.engine.generate(prompts, n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed, greedy=greedy)

    def load_weights(self, blob: bytes) -> float:
        """The fallback path (engines that cannot join the weight-transfer group): a full state dict."""
        from safetensors.torch import load as load_safetensors

        self.engine.load_state_dict(load_safetensors(blob))
        return float(getattr(self.engine, "last_sync_s", 0.0))

    def weight_transfer(self, phase: str, payload=None) -> float:
        """One phase of the collective sync (trainer.weight_sync drives it from learner rank 0)."""
        self.engine.weight_transfer(phase, payload)
        return float(getattr(self.engine, "last_sync_s", 0.0))

    def probe_logprobs(self, probe_ids: list[int]) -> list[float]:
        return self.engine.probe_logprobs(list(probe_ids))

    def shutdown(self) -> None:
        self.engine.shutdown()


class RolloutGroup:
    def __init__(self, cfg, model_path: str, cpus_per_actor: float = 0.0):
        self.cfg = cfg
        opts = {"num_cpus": cpus_per_actor, "num_gpus": cfg.rollout.gpus_per_actor}
        from kardia_rl.config import to_dict

        d = to_dict(cfg)
        self.actors = [RolloutActor.options(**opts).remote(d, model_path, i) for i in range(cfg.rollout.num_actors)]
        self.outstanding = [0] * len(self.actors)
        ray.get([a.ready.remote() for a in self.actors])

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
        return i, ref

    def done(self, index: int) -> None:
        self.outstanding[index] -= 1

    def load_state_dict(self, state_dict: dict) -> None:
        """Fallback sync: the full state dict once through the object store (see trainer.weight_sync)."""
        from safetensors.torch import save as save_safetensors

        blob = ray.put(save_safetensors({k: v.contiguous() for k, v in state_dict.items()}))
        ray.get([a.load_weights.remote(blob) for a in self.actors])

    def probe_logprobs(self, probe_ids: Sequence[int], timeout_s: Optional[float] = None) -> list[list[float]]:
        return ray.get([a.probe_logprobs.remote(list(probe_ids)) for a in self.actors], timeout=timeout_s)

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=60)
        except Exception:  # an engine that already died has nothing left to release
            pass
        for a in self.actors:
            ray.kill(a)
