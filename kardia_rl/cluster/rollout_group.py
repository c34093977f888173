"""The rollout group: R Ray actors, each owning one generation engine (vLLM, or transformers).

Work goes to an idle actor, one generate call per actor at a time (never queued behind another). Weight sync
(cluster.weight_sync) streams the learner's weights into each engine over a collective group; the actors
expose its phases, the probe scoring that verifies it, and the object-store fallback for the hf engine.

A dead actor is replaced in place (a new actor, same index, options and engine seed), then brought to the current
weights by the caller's `reload` (cluster.weight_sync.WeightSync.rejoin), whatever the step was doing:
- during generation, `restart` (called by rollout.generate_and_score, whose chunk is then sent again);
- during judging or a checkpoint (no call in flight), the next call finds it dead: the weight sync or the next
  step's generation;
- during a weight sync or its verification, `survive` (around WeightSync.sync): every actor that is dead, or does
  not answer within twice rollout.sync_timeout_s (stuck past its collective's timeout), is replaced, then the group is
  rebuilt and the sync run again.
Every dead actor is replaced BEFORE the group is rebuilt (a group rebuilt with a dead member fails again), and every
wait is bounded (rollout.actor_timeout_s, rollout.sync_timeout_s) by an error naming the actor. At most
rollout.max_restarts_per_step replacements per step; what is left (past that, the learner, Ray itself) is
checkpoint.auto_resume's.

Fault injection for tests/test_faults.py: a file named by $KARDIA_FAULT_ROLLOUT_FILE holds lines
`PHASE STEP ACTOR [kill|hold]`; at that step and phase (generation, judging, weight_sync, verification, checkpoint)
that actor's process SIGKILLs itself (or, with hold, blocks in its generate call after writing FILE.held, for the
SIGTERM test). Each line fires once (the replacement runs normally). Unset in normal runs: one environment lookup
per step.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import ray
from ray.exceptions import RayActorError

from kardia_rl.config import from_dict
from kardia_rl.errors import KardiaError
from kardia_rl.cluster.balance import least_loaded
from kardia_rl.cluster.preemption import ActorLost
from kardia_rl.utils.construction_log import record

FAULT_FILE_ENV = "KARDIA_FAULT_ROLLOUT_FILE"
# phase -> the actor call it fires in (None: the group fires it itself, the actor being idle then)
FAULT_PHASES = {"generation": "generate", "weight_sync": "update", "verification": "probe", "judging": None,
                "checkpoint": None}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what `kill -9` of the actor's process does


@ray.remote
class RolloutActor:
    def __init__(self, cfg_dict: dict, model_path: str, index: int):
        from kardia_rl.engines import engine_from_config

        cfg = from_dict(cfg_dict)
        self.index, self.armed, self.model_path = index, {}, model_path  # armed: actor call -> "kill" | (fault file, "hold") (tests only)
        self.update_open = False  # a weight update started and not finished (see weight_transfer)
        # verified against the learner's own forward: no CPU model copy here
        self.engine = engine_from_config(cfg, model_path, seed_offset=index, verify_reference=False)

    def ready(self) -> int:
        return self.index

    def arm(self, call: str, action: str, fault_file: str) -> None:
        """Tests only (see the module docstring): fault at this actor's next `call`."""
        self.armed[call] = (action, fault_file)

    def _fault(self, call: str) -> None:
        action, path = self.armed.pop(call, (None, None))
        if action == "hold":  # block like a very long generation until the driver kills us
            with open(path + ".held", "w") as f:
                f.write(str(os.getpid()))
            while True:
                time.sleep(1)
        if action == "kill":
            _die()

    def die(self) -> None:
        _die()

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, greedy: bool = False):
        if self.armed:
            self._fault("generate")
        record("call", "generate", self.model_path, n=n, prompts=len(prompts), greedy=bool(greedy))
        return self.engine.generate(prompts, n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed, greedy=greedy)

    def load_weights(self, blob: bytes) -> float:
        """The fallback path (engines that cannot join the weight-transfer group): a full state dict."""
        from safetensors.torch import load as load_safetensors

        self.engine.load_state_dict(load_safetensors(blob))
        return float(getattr(self.engine, "last_sync_s", 0.0))

    def weight_transfer(self, phase: str, payload=None):
        """One phase of the collective sync (cluster.weight_sync drives it from learner rank 0); the read-back
        check's phases (describe, check) return the engine's answer."""
        if self.armed:
            self._fault(phase)
        if phase == "start" and self.update_open:
            # A sync that failed elsewhere (another engine died) left this engine's update open: vLLM refuses a new
            # one until it is finished. Finishing loads what arrived; the sync that follows sends every weight again.
            self.engine.weight_transfer("finish")
            self.update_open = False
        try:
            out = self.engine.weight_transfer(phase, payload)
        except BaseException:
            self.update_open = self.update_open and phase != "update"  # vLLM closes an update that failed
            raise
        if phase in ("start", "update", "finish"):  # init and the read-back phases leave an open update open
            self.update_open = phase != "finish"
        return out if out is not None else float(getattr(self.engine, "last_sync_s", 0.0))

    def probe_logprobs(self, probe_ids: list[int]) -> list[float]:
        if self.armed:
            self._fault("probe")
        return self.engine.probe_logprobs(list(probe_ids))

    def shutdown(self) -> None:
        self.engine.shutdown()


class RolloutGroup:
    def __init__(self, cfg, model_path: str, cpus_per_actor: float = 0.0):
        from kardia_rl.config import to_dict

        self.cfg, self.model_path, self.cfg_dict = cfg, model_path, to_dict(cfg)
        self.opts = {"num_cpus": cpus_per_actor, "num_gpus": cfg.rollout.gpus_per_actor}
        self.timeout_s = float(cfg.rollout.actor_timeout_s)
        n = cfg.rollout.num_actors
        self.actors = [self._start(i) for i in range(n)]
        self.incarnation = [0] * n  # bumped at each replacement: a restart request for an older one is done already
        self.outstanding = [0] * n
        self.in_flight: dict[int, tuple] = {}  # actor index -> (its generate call, its incarnation)
        self._restart_lock = threading.RLock()
        self.step, self.step_restarts, self._faults = 0, 0, {}
        self._ready(range(n), "to start")

    def _start(self, index: int):
        return RolloutActor.options(**self.opts).remote(self.cfg_dict, self.model_path, index)

    def _ready(self, indices, what: str) -> None:
        """Wait (rollout.actor_timeout_s at most) until the actors answer; a dead or silent one is named."""
        indices = list(indices)
        refs = [self.actors[i].ready.remote() for i in indices]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        for i, ref in zip(indices, refs):
            if ref not in done:
                raise KardiaError(f"rollout actor {i} did not answer {what} within rollout.actor_timeout_s="
                                  f"{self.timeout_s:g}s (its engine is stuck or the cluster has no room for it)")
            ray.get(ref)  # an engine that failed to start raises its own error here

    # --- per step ----------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """A new step: reset the per-step restart budget; arm this step's injected faults (tests only)."""
        self.step, self.step_restarts = step, 0
        path = os.environ.get(FAULT_FILE_ENV)
        if path:
            self._faults = _take_faults(path, step)
            for (phase, index), action in list(self._faults.items()):
                if FAULT_PHASES[phase] is not None:
                    ray.get(self.actors[index].arm.remote(FAULT_PHASES[phase], action, path), timeout=self.timeout_s)
                    del self._faults[(phase, index)]

    def fault_point(self, phase: str, index: Optional[int] = None) -> None:
        """Tests only: kill the actor an injected fault names for this phase (driver-side phases)."""
        for (p, i) in [k for k in self._faults if k[0] == phase and index in (None, k[1])]:
            del self._faults[(p, i)]
            ref = self.actors[i].die.remote()
            ray.wait([ref], timeout=self.timeout_s)  # returns once the process is gone

    # --- generation --------------------------------------------------------------------------------------
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
        self.in_flight[i] = (ref, self.incarnation[i])
        return i, ref

    def done(self, index: int) -> None:
        self.outstanding[index] -= 1
        self.in_flight.pop(index, None)
        if self._faults:
            self.fault_point("judging", index)  # its chunk goes on to the judges now

    def restart(self, index: int, error: BaseException, reload: Callable[[list[int]], object]) -> None:
        """Generate call of actor `index` failed with a dead actor: replace it, and every other actor found dead
        meanwhile, then `reload(indices)` (rebuild the group, send the current weights, verify).

        The group's collectives need every engine, so this waits (rollout.actor_timeout_s at most, naming the
        actor) until the other actors' generate calls are done; their results stay valid: they had the current
        weights. A second chunk whose actor died too comes here after this one: its actor is new already, so it
        only sends its chunk again.
        """
        with self._restart_lock:
            ref_inc = self.in_flight.get(index)
            if ref_inc is not None and ref_inc[1] != self.incarnation[index]:
                return  # replaced, with the current weights, by a restart that ran while this one waited
            self._replace([index], error)
            others = [(k, ref) for k, (ref, _) in list(self.in_flight.items()) if k != index]
            if others:
                done, _ = ray.wait([r for _, r in others], num_returns=len(others), timeout=self.timeout_s)
                late = [k for k, r in others if r not in done]
                if late:
                    raise KardiaError(f"rollout actor {late[0]} did not finish its chunk within rollout.actor_timeout_s="
                                      f"{self.timeout_s:g}s while actor {index} was replaced (a stuck engine?)")
            self._heal([index] + self._replace_dead(error), reload)

    # --- any other phase ---------------------------------------------------------------------------------
    def survive(self, fn: Callable[[], dict], reload: Callable[[list[int]], object]) -> dict:
        """`fn()` (a weight sync and its verification), surviving rollout actors that die during it: on a failure,
        every dead (or stuck) actor is replaced, `reload` rebuilds the group and syncs them, then `fn` runs again.
        A failure with every actor alive is not ours: raised as it is."""
        return self._heal([], reload, fn)

    def _heal(self, pending: list[int], reload: Callable[[list[int]], object], fn=None):
        """`reload(pending)` (when any), then `fn()`; an actor that dies meanwhile (also one the reload's own group
        rebuild or verification finds dead) is replaced and reloaded too, within the step's restart budget."""
        while True:
            try:
                if pending:
                    reload(pending)
                    pending = []
                return fn() if fn is not None else None
            except Exception as e:  # noqa: BLE001 - re-raised below unless a rollout actor is dead
                with self._restart_lock:  # a live engine left in a collective answers once it times out
                    dead = self._replace_dead(e, wait_s=2 * float(self.cfg.rollout.sync_timeout_s))
                if not dead:
                    raise
                pending = sorted(set(pending) | set(dead))

    def _replace_dead(self, error: BaseException, wait_s: Optional[float] = None) -> list[int]:
        """Replace every actor that is dead or does not answer within `wait_s`; returns their indices."""
        wait_s = self.timeout_s if wait_s is None else wait_s
        refs = [a.ready.remote() for a in self.actors]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        dead, seen = [], None
        for i, ref in enumerate(refs):
            if ref not in done:
                print(f"[rollout] actor {i} did not answer within {wait_s:g}s: replacing it as stuck",
                      file=sys.stderr, flush=True)
                dead.append(i)
                continue
            try:
                ray.get(ref)
            except RayActorError as e:
                dead.append(i)
                seen = seen or e
        self._replace(dead, seen or error)  # the death itself, rather than the failure it caused elsewhere
        return dead

    def _replace(self, indices: Sequence[int], error: BaseException) -> None:
        """New actors in place of `indices` (same index, options, engine seed), started together."""
        if not indices:
            return
        limit = self.cfg.rollout.max_restarts_per_step
        if self.step_restarts + len(indices) > limit:
            raise ActorLost(
                f"rollout actor {indices[0]} died at step {self.step} ({type(error).__name__}) after "
                f"{self.step_restarts} rollout actor restart(s) in this step (rollout.max_restarts_per_step={limit}); "
                "its engine keeps failing: look at that actor's log above, then resume with checkpoint.resume=true")
        t0 = time.perf_counter()
        for i in indices:
            print(f"[rollout] actor {i} died at step {self.step} ({type(error).__name__}); starting a new one with the "
                  "current weights", file=sys.stderr, flush=True)
            ray.kill(self.actors[i])  # it may only be unreachable: never two engines for one index
            self.actors[i] = self._start(i)
            self.incarnation[i] += 1
        self.step_restarts += len(indices)
        self._ready(indices, "after its restart")
        print(f"[rollout] actor(s) {list(indices)} restarted in {time.perf_counter() - t0:.1f}s", file=sys.stderr,
              flush=True)

    # --- weights -----------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict, indices: Optional[Sequence[int]] = None) -> None:
        """Fallback sync: the full state dict once through the object store (see cluster.weight_sync), into every
        actor or only `indices`."""
        from safetensors.torch import save as save_safetensors

        blob = ray.put(save_safetensors({k: v.contiguous() for k, v in state_dict.items()}))
        targets = self.actors if indices is None else [self.actors[i] for i in indices]
        ray.get([a.load_weights.remote(blob) for a in targets], timeout=self.cfg.rollout.sync_timeout_s)

    def probe_logprobs(self, probe_ids: Sequence[int], timeout_s: Optional[float] = None) -> list[list[float]]:
        return ray.get([a.probe_logprobs.remote(list(probe_ids)) for a in self.actors], timeout=timeout_s)

    def shutdown(self, graceful: bool = True) -> None:
        """Engines released cleanly (60 s at most), or, after SIGTERM (graceful=False), killed at once: a
        generate call in flight would hold a graceful shutdown until it finished."""
        if graceful:
            try:
                ray.get([a.shutdown.remote() for a in self.actors], timeout=60)
            except Exception:  # an engine that already died has nothing left to release
                pass
        for a in self.actors:
            ray.kill(a)


def _take_faults(path: str, step: int) -> dict:
    """This step's lines of the fault file (removed from it: each fires once) as {(phase, actor): action}."""
    from kardia_rl.utils.io import atomic_write_text

    try:
        with open(path) as f:
            lines = [ln.split() for ln in f if ln.strip()]
    except FileNotFoundError:
        return {}
    mine = {(ln[0], int(ln[2])): (ln[3] if len(ln) > 3 else "kill") for ln in lines if int(ln[1]) == step}
    if mine:
        atomic_write_text(path, "".join(" ".join(ln) + "\n" for ln in lines if int(ln[1]) != step))
    unknown = [p for p, _ in mine if p not in FAULT_PHASES]
    if unknown:
        raise KardiaError(f"{path}: unknown fault phase {unknown[0]!r} (one of {', '.join(FAULT_PHASES)})")
    return mine
