#!/usr/bin/env bash
# GPU acceptance kit (docs/BENCHMARKS.md "GPU acceptance kit"): prove the GPU path in one command.
#
#   bash scripts/gpu_check.sh prepare                # here, with the network: wheels + tokenizer into .gpu/
#   bash scripts/gpu_check.sh run                    # on the GPU machine: python3, writes to $OUT
#   bash scripts/gpu_check.sh run --cpu --out DIR    # the CPU rehearsal (.venv, tiny sizes)
#
# Extra arguments go to bench/gpu/kit.py (--only, --budget PART=S, --deadline S, --work DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-}"
shift || true
case "$cmd" in
  prepare)
    [ -x .venv/bin/python ] || { echo "error: .venv missing: run bash scripts/install.sh first" >&2; exit 2; }
    exec .venv/bin/python bench/gpu/prepare.py "$@"
    ;;
  run)
    py="${PYTHON:-python3}"
    for a in "$@"; do [ "$a" = "--cpu" ] && py="${PYTHON:-.venv/bin/python}"; done
    has_out=0
    for a in "$@"; do [ "$a" = "--out" ] && has_out=1; done
    if [ "$has_out" = 0 ]; then
      [ -n "${OUT:-}" ] || { echo "error: give --out DIR or set OUT" >&2; exit 2; }
      set -- "$@" --out "$OUT"
    fi
    exec "$py" bench/gpu/kit.py "$@"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare | run [--cpu] [--out DIR] [kit options]" >&2
    exit 2
    ;;
esac
