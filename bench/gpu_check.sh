#!/usr/bin/env bash
# GPU check for a machine with torch (CUDA), transformers, peft and accelerate only: no ray,
# deepspeed or vllm, no network. Everything it needs travels with the working tree (it builds a random Qwen2
# model on the spot). Under 10 minutes on one GPU. Results: $OUT/gpu_check.json (or /tmp/gpu_check.json).
#   bash bench/gpu_check.sh          # on the GPU machine
#   bash bench/gpu_check.sh --cpu    # the same code, small, on CPU (tests/test_plan.py runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT_DIR="${OUT:-/tmp}"
# every tensor above 64 KiB its own mmap: freed memory leaves RSS, so the CPU peak-RSS reading follows live memory
export MALLOC_MMAP_THRESHOLD_=65536
mkdir -p "$OUT_DIR"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
timeout 540 "$PY" bench/gpu_check.py --out "$OUT_DIR/gpu_check.json" "$@"
echo "results: $OUT_DIR/gpu_check.json"
