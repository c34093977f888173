"""`kardia-rl synthesize CONFIG --profiles P --seeds S --out DIR [key=value ...]`."""
from __future__ import annotations

import hashlib
import os
import secrets
import sys
import time
from dataclasses import replace

from kardia_rl.errors import KardiaError


def _salt(cfg, out_dir: str) -> str:
    """The username-hashing salt: $synth.salt_env, else a random one kept in OUT/.salt (owner-only) so that a
    resumed run hashes the same usernames to the same pseudonyms. Do not publish OUT/.salt."""
    env = os.environ.get(cfg.synth.salt_env, "") if cfg.synth.salt_env else ""
    if env:
        return env
    path = os.path.join(out_dir, ".salt")
    if not os.path.isfile(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def build_roles(cfg, labels, secret: str):
    """The three clients from synth.*: engine roles share one rollout group (synth.num_engines Ray actors); a
    judge evaluator runs on the judge pool. A model is never loaded in this process (synth.pool=local is for
    HTTP roles only and refuses the others)."""
    from kardia_rl.synth import roles
    from kardia_rl.synth.loop import Roles

    sy = cfg.synth
    kinds = {"user": sy.user_backend, "responder": sy.responder_backend, "evaluator": sy.evaluator_backend}
    local_models = [f"synth.{role}_backend=engine" for role, kind in kinds.items() if kind == "engine"]
    if sy.evaluator_backend == "judge" and cfg.judge.backend in ("vllm", "hf"):
        local_models.append(f"synth.evaluator_backend=judge with judge.backend={cfg.judge.backend}")
    if sy.pool == "local" and local_models:
        raise KardiaError(f"synth.pool=local: {', '.join(local_models)} would load a model in this process; model roles "
                          "run on the Ray pools (rollout group, judge pool): set synth.pool=ray, or send the role to an "
                          "endpoint (synth.<role>_backend=openai)")
    engine_client = None
    if "engine" in kinds.values():
        path = sy.model or cfg.model.path
        if path.startswith("builtin:") and not sy.model:
            from kardia_rl.model.prepare import build_builtin

            path = build_builtin(cfg)
        if not os.path.isdir(path):
            raise KardiaError(f"synth.model / model.path {path!r}: not a model directory (build one with "
                              "`kardia-rl init-model` or `kardia-rl prepare`)")
        # the engines are sized for the longest role output, and the pool has synth.num_engines engines
        longest = max(cfg.model.max_new_tokens, sy.responder_max_tokens, sy.user_max_tokens,
                      sy.evaluator_max_tokens if sy.evaluator_backend == "engine" else 0)
        ecfg = replace(cfg, model=replace(cfg.model, max_new_tokens=longest),
                       rollout=replace(cfg.rollout, num_actors=sy.num_engines))
        engine_client = roles.RayEngineClient(ecfg, path)
    judge_client = None
    if sy.evaluator_backend == "judge":
        judge_client = roles.judge_client(cfg)
    made = {}
    for role, kind in kinds.items():
        made[role] = {"engine": engine_client, "judge": judge_client}.get(kind) or roles.openai_client(cfg, role)
    return Roles(made["user"], made["responder"], made["evaluator"], labels, secret)


def close_roles(r) -> None:
    seen = set()
    for client in (r.user, r.responder, r.evaluator):
        if id(client) not in seen:
            seen.add(id(client))
            client.close()


class _Stopped(Exception):
    """Raised by a guarded role call after SIGTERM: ends RefinementLoop.run (which has no stop hook)."""


class _Guarded:
    """A role client that refuses new calls once `stop` (cluster.preemption.StopSignal) is set. Calls already
    in flight finish (an engine generate or an HTTP request cannot be cut without losing its work); dialogues
    still in flight are not recorded, and a re-run synthesises them again with the same per-dialogue seeds, so
    it ends with the same output as an uninterrupted run."""

    def __init__(self, client, stop):
        self._client, self._stop = client, stop

    def complete(self, *a, **kw):
        if self._stop.requested:
            raise _Stopped
        return self._client.complete(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._client, name)


def cmd_synthesize(args) -> int:
    from tqdm.auto import tqdm

    from kardia_rl.config.cli import config_from_args
    from kardia_rl.data import label_set
    from kardia_rl.synth import inputs, output
    from kardia_rl.synth.loop import RefinementLoop
    from kardia_rl.cluster.preemption import StopSignal

    def stopped() -> int:
        print(f"synthesize: stopped by SIGTERM; {len(store.results)} finished dialogues are saved in "
              f"{store.dir}; re-run the same command with --out {args.out} to resume", file=sys.stderr)
        return 128 + 15  # what a shell reports for a process ended by SIGTERM

    # SIGTERM (`ray job stop`, Kubernetes, Slurm): the first one only sets stop.requested (a second one kills);
    # role calls then stop starting, finished dialogues are flushed, and the command exits 143.
    with StopSignal("finishing the role calls in flight, then saving finished dialogues and stopping") as stop:
        cfg = config_from_args(args)
        labels = label_set(cfg.data.emotion_labels or None)
        os.makedirs(args.out, exist_ok=True)
        salt = _salt(cfg, args.out)
        profiles = inputs.load_profiles(args.profiles, salt)
        seeds = inputs.load_seeds(args.seeds, labels)
        todo_all = inputs.pairs(profiles, seeds, cfg.synth.pairing, cfg.synth.max_dialogues)
        store = output.ShardStore(args.out, cfg.synth.shard_size)
        todo = [(p, s) for p, s in todo_all if inputs.dialogue_id(p, s) not in store.done_ids]
        print(f"synthesize: {len(todo_all)} dialogues ({len(profiles)} profiles x {len(seeds)} seeds, "
              f"{cfg.synth.pairing}), {len(todo_all) - len(todo)} already done in {args.out}", file=sys.stderr)
        t0, new, startup = time.perf_counter(), 0, 0.0
        calls: dict = {}
        if todo and not stop.requested:
            secret = hashlib.sha256(f"{salt}:{cfg.seed}".encode()).hexdigest()  # R's nonces: unknown to A
            clients = build_roles(cfg, labels, secret)
            startup, t0 = time.perf_counter() - t0, time.perf_counter()  # dialogues/s counts synthesis, not loading
            guarded: dict = {}  # one wrapper per client: the loop serialises calls to a client shared by two roles

            def guard(client):
                return guarded.setdefault(id(client), _Guarded(client, stop))

            loop = RefinementLoop(cfg, replace(clients, user=guard(clients.user), evaluator=guard(clients.evaluator),
                                               responder=guard(clients.responder)))
            stats = {"kept": 0, "dropped": 0, "FAIL": 0, "PASS": 0, "SOLVED": 0}
            bar = tqdm(total=len(todo), desc="synthesize", unit="dialogue", disable=args.no_progress)

            def on_done(rec_id, record, drop):
                nonlocal new
                store.add(rec_id, record, drop)
                new += 1
                stats["dropped" if record is None else "kept"] += 1
                for t in (record or {}).get("verdicts", []):
                    for v in t:
                        stats[v] += 1
                bar.update(1)
                bar.set_postfix(stats, refresh=False)

            try:
                loop.run(todo, on_done)
            except _Stopped:
                pass  # reported below, after the finished dialogues are flushed
            finally:
                store.flush()  # finished dialogues in the buffer are complete: keep them for the next run
                bar.close()
                loop.close()  # waits for calls still in flight
                calls = loop.calls
                close_roles(clients)
        if stop.requested:  # skip the filters: a grace period is short, and the re-run filters everything anyway
            return stopped()
        seconds = time.perf_counter() - t0
        kept, drops = output.finalize(args.out, store.results, cfg, labels,
                                      cache_dir=os.path.join(args.out, output.EMBED_CACHE_DIR))
        s = output.write_summary(args.out, total=len(todo_all), results=store.results, kept=kept, drops=drops,
                                 resumed=store.resumed, new=new, seconds=seconds, startup=startup, calls=calls,
                                 tau=cfg.split.tau)
        print(f"synthesize: {s['kept']} kept, {s['dropped']} dropped {s['drops']}, verdicts {s['verdicts']}, "
              f"{s['dialogues_per_s']} dialogues/s -> {s['output']} (summary.json beside it)")
        if stop.requested:  # arrived while the output was written (complete: every write is atomic)
            return stopped()
    return 0


def _configure(p) -> None:
    from kardia_rl.config.cli import add_config_args

    add_config_args(p, example="synth.max_revisions=3")
    p.add_argument("--profiles", required=True, help="profiles: .jsonl, or PersonalityCafe-style text blocks")
    p.add_argument("--seeds", required=True, help="seed situations: .csv or .jsonl with situation, emotion")
    p.add_argument("--out", required=True, help="output directory (resumable: a re-run skips finished dialogues)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


cmd_synthesize.configure = _configure
