#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv when missing, then runs the whole pipeline on the tiny
# local model, the bundled KardiaBench sample and a local Ray cluster on 127.0.0.1.
# Extra arguments are config overrides, e.g.: bash launch/quickstart.sh algo.num_steps=5
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh"
cd "$root"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 WANDB_MODE="${WANDB_MODE:-offline}" DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec "$root/.venv/bin/kardia-rl" pipeline conf/tiny.yaml "$@"
