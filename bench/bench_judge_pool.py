"""Judge-pool throughput against a loopback OpenAI-compatible judge with a fixed latency, J = 1, 2, 4, 8 actors.

    .venv/bin/python bench/bench_judge_pool.py                 # 200 ms judge, 2 in flight per actor, 64 x J requests
    .venv/bin/python bench/bench_judge_pool.py --quick         # 16 x J requests
    .venv/bin/python bench/bench_judge_pool.py --smoke         # does it still run? (J = 1, 2; 2 x J requests)

Method (also printed by the run):
- The judge server is an aiohttp app in a child process on 127.0.0.1 (its own event loop, so the bench's
  own work cannot delay its replies). Every POST /v1/chat/completions sleeps `--latency-ms` (asyncio.sleep,
  so any number of requests wait concurrently) and answers a valid rubric judgment (five dimensions, score
  4, carrying the request's nonce as kardia-rl's injection-proof parser requires). It counts requests and the
  peak number in flight (GET /stats), which checks the bound the pool should reach: J x in-flight.
- The pool is kardia-rl's real one: `JudgePool` over J `JudgeActor`s (Ray local on 127.0.0.1, num_cpus=0
  each), each running `RubricJudge` + the `openai` chat backend with judge.max_in_flight = k (its HTTP
  semaphore and connection pool), no cache, no retries needed (every reply is valid).
- Load: R = `--requests-per-actor` x J distinct requests (real profiles and turns from the bundled data, a
  distinct reply each), submitted at once as R concurrent `JudgePool.judge([request])` calls, so the pool
  always has work queued and throughput is bounded by J x k / latency. Each J first runs one untimed wave
  (J x k requests: HTTP sessions, imports); then the timed run. Throughput = R / wall time
  (time.perf_counter around the whole batch, from first submission to last judgment back).
- Scaling efficiency(J) = throughput(J) / (J x throughput(1)); target >= 0.9 for every J. The CPU time that
  the driver, the actors and the server spent per request during the timed run is printed too: when the
  machine cannot supply it (short latencies, many requests in flight, other load), CPU, not the judge's
  latency, bounds the throughput and the scaling efficiency drops.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, bench_samples, load_line, median, other_processes_busy, set_bench_env, table,  # noqa: E402
                    target_line)


# ---------------------------------------------------------------------------------------------- the server
def serve(latency_s: float, conn) -> None:
    """Child process: a fixed-latency OpenAI-compatible judge on 127.0.0.1; sends its port through `conn`."""
    import re
    import socket

    from aiohttp import web

    from kardia_rl.rewards.judge.base import DIMENSIONS

    nonce_re = re.compile(r"\bid=([A-Za-z0-9_-]+)")
    state = {"requests": 0, "in_flight": 0, "peak_in_flight": 0}

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        state["requests"] += 1
        state["in_flight"] += 1
        state["peak_in_flight"] = max(state["peak_in_flight"], state["in_flight"])
        try:
            await asyncio.sleep(latency_s)
            found = next((m for m in (nonce_re.search(str(x.get("content", ""))) for x in body["messages"]) if m), None)
            verdict = {d: {"score": 4, "rationale": f"{d} is adequate"} for d in DIMENSIONS}
            if found:
                verdict = {"id": found.group(1), **verdict}
            return web.json_response({
                "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", ""),
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": json.dumps(verdict)}}]})
        finally:
            state["in_flight"] -= 1

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(state)

    async def reset(request: web.Request) -> web.Response:
        state.update(requests=0, peak_in_flight=state["in_flight"])
        return web.json_response(state)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/stats", stats)
        app.router.add_post("/reset", reset)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock, backlog=1024).start()
        conn.send(sock.getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def server_call(port: int, path: str, method: str = "GET") -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------------------------- the load
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_requests(n: int, tag: str, contexts: list) -> list:
    from kardia_rl.rewards.judge.base import JudgeRequest

    out = []
    for i in range(n):
        s = contexts[i % len(contexts)]
        hist = tuple((m["role"], m["content"]) for m in s.history if m["role"] in ("user", "assistant"))[-3:]
        reply = f"That sounds really hard, and it makes sense you feel this way ({tag} #{i})."
        out.append(JudgeRequest(person=s.person, situation=s.situation, history=hist, response=reply,
                                group_id=f"{tag}:{i // 8}"))
    return out


async def judge_all(pool, requests: list) -> list:
    """Every request as its own pool call, all at once (the pool spreads them over the least-loaded actors)."""
    res = await asyncio.gather(*(pool.judge([r]) for r in requests))
    return [r[0] for r in res]


def run_pool(args, j: int, port: int, server_pid: int, contexts: list) -> dict:
    from kardia_rl.config import load_config
    from kardia_rl.cluster.judge_pool import JudgePool

    cfg = load_config(os.path.join(ROOT, "conf", "tiny.yaml"), [
        "judge.backend=openai", f"judge.api_base=http://127.0.0.1:{port}/v1", "judge.model=loopback-judge",
        f"judge.num_actors={j}", f"judge.max_in_flight={args.in_flight}", "judge.timeout_s=60", "judge.max_retries=2",
        "judge.cache_size=0", "judge.group_wise=false", "judge.requests_per_minute=0", "ray.cpus_per_actor=0",
        "logging.wandb_mode=disabled"])
    t = time.perf_counter()
    pool = JudgePool(cfg, cfg.ray.cpus_per_actor)
    startup = time.perf_counter() - t
    try:
        warm = asyncio.run(judge_all(pool, make_requests(j * args.in_flight, f"warm{j}", contexts)))
        if not all(x.ok for x in warm):
            raise SystemExit(f"J={j}: warm-up judgments failed: {[x.error for x in warm if not x.ok][:3]}")
        server_call(port, "/reset", "POST")
        n = args.requests if args.requests else args.requests_per_actor * j
        reqs = make_requests(n, f"J{j}", contexts)
        load_before = os.getloadavg()[0]
        import ray

        pids = {"driver": [os.getpid()], "actors": ray.get([a.pid.remote() for a in pool.actors]),
                "server": [server_pid]}
        cpu0 = {k: sum(cpu_seconds(x) for x in v) for k, v in pids.items()}
        t = time.perf_counter()
        res = asyncio.run(judge_all(pool, reqs))
        wall = time.perf_counter() - t
        cpu = {k: sum(cpu_seconds(x) for x in v) - cpu0[k] for k, v in pids.items()}
        srv = server_call(port, "/stats")
        stats = pool.stats()
    finally:
        pool.shutdown()
    lat = sorted(x.latency_s for x in res)
    return {"actors": j, "requests": n, "wall_s": wall, "throughput": n / wall, "ok": sum(x.ok for x in res),
            "ideal": j * args.in_flight / (args.latency_ms / 1000), "server_requests": srv["requests"],
            "peak_in_flight": srv["peak_in_flight"], "latency_p50": median(lat),
            "latency_p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "startup_s": startup,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "retries": stats.get("judge/retries", 0), "failures": stats.get("judge/failures", 0),
            "cpu_ms_per_request": {k: 1e3 * v / n for k, v in cpu.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--actors", default="1,2,4,8", help="comma list of judge-pool sizes J (must include 1)")
    p.add_argument("--latency-ms", type=float, default=200.0, help="the server's fixed latency per request")
    p.add_argument("--in-flight", type=int, default=2, help="judge.max_in_flight per actor (k)")
    p.add_argument("--requests-per-actor", type=int, default=64, help="timed requests = this x J")
    p.add_argument("--requests", type=int, default=0, help="a fixed number of timed requests for every J instead")
    p.add_argument("--quick", action="store_true", help="16 requests per actor")
    p.add_argument("--smoke", action="store_true", help="does the bench still run (tests/test_bench_smoke.py): "
                   "J = 1, 2, 2 requests per actor, 10 ms judge; its numbers mean nothing")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.requests_per_actor = 16
    if args.smoke:
        args.actors, args.requests_per_actor, args.latency_ms = "1,2", 2, 10.0
    actors = [int(x) for x in args.actors.split(",")]
    if 1 not in actors:
        raise SystemExit("--actors must include 1 (the efficiency baseline)")
    set_bench_env()
    print(f"bench_judge_pool: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"start: {load_line()}")
    busy = other_processes_busy()
    print("other busy processes at start: " + ("; ".join(busy[:6]) if busy else "none"))
    print(__doc__.split("Method (also printed by the run):\n")[1])

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(args.latency_ms / 1000, child), daemon=True)
    server.start()
    rows = []
    try:
        if not parent.poll(60):
            raise SystemExit("the loopback judge server did not start within 60 s")
        port = parent.recv()
        from kardia_rl.cluster.ray_cluster import init_ray

        init_ray("", 2)
        contexts = bench_samples(16)
        for j in sorted(actors):
            rows.append(run_pool(args, j, port, server.pid, contexts))
            r = rows[-1]
            print(f"  J={j}: {r['requests']} requests in {r['wall_s']:.2f} s = {r['throughput']:.1f} req/s "
                  f"(ideal {r['ideal']:.1f}); {load_line()}", flush=True)
        import ray

        ray.shutdown()
    finally:
        server.terminate()
        server.join(10)
    base = next(r for r in rows if r["actors"] == 1)["throughput"]
    for r in rows:
        r["efficiency"] = r["throughput"] / (r["actors"] * base)
    print(f"\njudge latency {args.latency_ms:.0f} ms, judge.max_in_flight {args.in_flight} per actor; "
          f"ideal throughput = J x {args.in_flight} / {args.latency_ms / 1000:g} s")
    print(table(["J", "requests", "wall s", "req/s", "ideal req/s", "% of ideal", "efficiency", "peak in flight",
                 "p50 ms", "p95 ms", "ok", "start s", "load"],
                [(r["actors"], r["requests"], f"{r['wall_s']:.2f}", f"{r['throughput']:.1f}", f"{r['ideal']:.1f}",
                  f"{100 * r['throughput'] / r['ideal']:.0f}", f"{r['efficiency']:.2f}", r["peak_in_flight"],
                  f"{1e3 * r['latency_p50']:.0f}", f"{1e3 * r['latency_p95']:.0f}", f"{r['ok']}/{r['requests']}",
                  f"{r['startup_s']:.1f}", f"{r['load_before']:.1f}->{r['load_after']:.1f}") for r in rows]))
    print("CPU per judged request (ms; driver = JudgePool + Ray client, actors = RubricJudge + HTTP client, server = "
          "the loopback judge): " + "; ".join(f"J={r['actors']}: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                               r["cpu_ms_per_request"].items())
                                              for r in rows))
    worst = min(rows, key=lambda r: r["efficiency"])
    print(target_line("scaling efficiency >= 0.9 for J=1..{}".format(max(actors)),
                      f"min {worst['efficiency']:.2f} (J={worst['actors']})", worst["efficiency"] >= 0.9))
    print(f"end: {load_line()}")
    if args.json_out:
        from kardia_rl.utils.io import atomic_write_text

        atomic_write_text(args.json_out, json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
