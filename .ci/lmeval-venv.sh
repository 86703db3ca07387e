#!/usr/bin/env bash
# Create (or reuse) lm-evaluation-harness's own virtualenv for the lm-eval acceptance tests and print its python.
#
# lm-eval is a heavy client with its own dependency tree (datasets, evaluate, sacrebleu, ...), so it never goes
# into the project venv. Idempotent: a venv whose python already imports lm_eval, peft and its API models is kept.
#   * torch==2.13.0 is installed first so pip takes the CPU wheel instead of CUDA wheels;
#   * `lm-eval[api]` brings what its local-completions / local-chat-completions models need (aiohttp, tenacity,
#     tiktoken); peft is for its `hf` reference model with `peft=ADAPTER_DIR`.
set -euo pipefail

VENV="${LORA_GATEWAY_LMEVAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-gateway/lmeval-venv}"
PYTHON_BIN="${PYTHON:-python3}"
CHECK="import lm_eval, peft, lm_eval.models.openai_completions"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
    echo "$VENV/bin/python"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON_BIN" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" >&2
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" "lm-eval[api]==0.4.13" "peft" >&2
"$VENV/bin/python" -c "$CHECK" >&2
echo "$VENV/bin/python"
