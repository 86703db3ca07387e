#!/usr/bin/env bash
# Create (or reuse) lm-evaluation-harness's own virtualenv for the lm-eval acceptance tests and print its python
# (see .ci/tool-venv.sh).
#
# lm-eval is a heavy client with its own dependency tree (datasets, evaluate, sacrebleu, ...). `lm-eval[api]` brings
# what its local-completions / local-chat-completions models need (aiohttp, tenacity, tiktoken); peft is for its
# `hf` reference model with `peft=ADAPTER_DIR`.
set -euo pipefail
VENV="${LORA_GATEWAY_LMEVAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-gateway/lmeval-venv}"
exec bash "$(dirname "$0")/tool-venv.sh" "$VENV" "import lm_eval, peft, lm_eval.models.openai_completions" \
    "lm-eval[api]==0.4.13" "peft"
