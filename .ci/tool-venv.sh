#!/usr/bin/env bash
# Create (or reuse) a tool's own virtualenv and print its python: tool-venv.sh VENV CHECK PACKAGE...
#
# For heavy tools that pin their own dependency trees (vLLM, lm-evaluation-harness), which never go into the
# project venv. Idempotent: a venv whose python already runs CHECK is left alone. torch==2.13.0 is installed first
# and named again with the packages, so pip keeps the CPU wheel instead of pulling CUDA wheels.
set -euo pipefail

VENV="$1"
CHECK="$2"
shift 2
PYTHON_BIN="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
    echo "$VENV/bin/python"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON_BIN" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" >&2
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" "$@" >&2
if [ -n "${TOOL_VENV_AFTER:-}" ]; then
    eval "$TOOL_VENV_AFTER" >&2
fi
"$VENV/bin/python" -c "$CHECK" >&2
echo "$VENV/bin/python"
