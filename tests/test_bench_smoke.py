"""Every benchmark in bench/ still runs: each script's smoke mode (smallest sizes, one step), in a subprocess.

A benchmark is never run by the rest of the suite, so an API change could break one unseen. Here a broken
benchmark fails the suite; nothing about its timing is asserted (its numbers mean nothing at these sizes).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")

# script -> the argument lists of its smoke runs (None: another test runs it, named beside it)
SMOKE_RUNS = {
    "bench_grpo_step.py": [["--smoke"]],  # ours and TRL's GRPOTrainer, then the diagnosis pass
    "bench_generation.py": [["--smoke"]],
    "bench_learner.py": [["--smoke"], ["--smoke", "--activation-memory"], ["--smoke", "--startup-memory"]],
    "bench_judge_pool.py": [["--smoke"]],
    "bench_weight_sync.py": [["--smoke"]],
    "bench_embedding_judge.py": [["--smoke"]],
    "bench_synth.py": [["--smoke"]],
    "measure_sync_tolerance.py": [["--smoke"]],
    "bench_checkpoint.py": [["--smoke"], ["--files-only"]],
    "bench_loss_memory.py": [["--smoke"]],
    "bench_async.py": [["--smoke"]],  # staleness 0 vs 1 on the tiny model, 1 warm-up + 1 step each
    "bench_export_memory.py": [["--smoke"]],
    "gpu_check.sh": None,  # tests/test_plan.py::test_gpu_check_runs_on_cpu runs `bash bench/gpu_check.sh --cpu`
}
NOT_BENCHMARKS = {"common.py", "gpu_check.py", "README.md"}  # helpers (gpu_check.py is run by gpu_check.sh), docs


def test_every_benchmark_has_a_smoke_run():
    """A new script in bench/ must name its smoke run here (or be listed as a helper)."""
    present = {f for f in os.listdir(BENCH) if not f.startswith((".", "__"))}
    assert present - NOT_BENCHMARKS == set(SMOKE_RUNS), (
        f"bench/ scripts without a smoke entry: {sorted(present - NOT_BENCHMARKS - set(SMOKE_RUNS))}; "
        f"entries without a script: {sorted(set(SMOKE_RUNS) - present)}")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("script,args", [(s, a) for s, runs in SMOKE_RUNS.items() if runs for a in runs],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_benchmark_smoke_mode_runs(script, args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    tail = (proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-3000:])
    assert proc.returncode == 0, f"bench/{script} {' '.join(args)} exited {proc.returncode}:\n{tail}"
