#!/usr/bin/env bash
# Submit a kardia-rl job to a running Ray cluster:
#   RAY_ADDRESS=http://HEAD:8265 bash launch/submit.sh conf/cluster.yaml [key=value ...]
# The checkout is shipped as the job's working directory (runs/, .venv/ and wandb/ excluded); the job runs
# `kardia-rl pipeline` (set KARDIA_CMD=train for GRPO only). Extra arguments are config overrides.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${1:?usage: launch/submit.sh CONFIG [key=value ...]}"; shift
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
cmd="${KARDIA_CMD:-pipeline}"
ray_bin="${RAY_BIN:-$(command -v ray || echo "$root/.venv/bin/ray")}"
exec "$ray_bin" job submit --address "$address" --working-dir "$root" \
  --runtime-env-json '{"excludes": [".venv", "runs", "wandb", ".git"]}' \
  ${KARDIA_SUBMIT_ARGS:-} -- python -m kardia_rl.cli "$cmd" "$config" "$@"
