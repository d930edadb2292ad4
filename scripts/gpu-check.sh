#!/usr/bin/env bash
# The GPU measurements of issue #12 in one call of the device tool (one H100/H200, no network, no Rust; its
# python3 has torch and transformers). Writes $OUT/gpu-check.json and one log per bake run.
#
#   scripts/gpu-check.sh prepare   here: the CUDA build (scripts/build-cuda.sh), SmolLM2's tokenizer and the
#                                  TruthfulQA prompts' token ids, all into target/gpu-carry (about 18 MB)
#   scripts/gpu-check.sh run       on the device: the device tool's `run` with command
#                                  `scripts/gpu-check.sh run`, carry ["target/gpu-carry"], timeout_s 540
#   scripts/gpu-check.sh smoke     here, on the CPU: the same script with tiny shapes and the CPU build, to
#                                  check the script itself before spending device time
# Needs the environment of scripts/setup-test-env.sh for prepare and smoke (BAKE_SMOLLM2, BAKE_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
carry=target/gpu-carry
case "${1:-run}" in
  prepare)
    scripts/build-cuda.sh
    cargo build --release -q --example prompt_tokens
    cp "$BAKE_SMOLLM2/tokenizer.json" "$carry/tokenizer.json"
    ./target/release/examples/prompt_tokens "$carry/tokenizer.json" > "$carry/prompts.json"
    du -sh "$carry";;
  run)
    out=${OUT:-/tmp/gpu-check-out}
    # Models of 13.5 and 26 GB are made here (the machine has 64 GB of disk); only this run's folder is removed.
    work=$(mktemp -d -p "${GPU_CHECK_DIR:-/tmp}" gpu-check.XXXXXX)
    mkdir -p "$out"
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$carry/bake.xz" "$work/bake"
    chmod +x "$work/bake"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" || true
    # candle's kernels are PTX, JIT-compiled by the driver on first use (~14 s); a large compute cache keeps
    # them for every later bake process of this run.
    export CUDA_CACHE_MAXSIZE=4294967296 CUDA_CACHE_PATH=$work/nv-cache
    python3 scripts/gpu/check.py --bake "$work/bake" --carry "$carry" --work "$work" --out "$out" 2>&1 \
      | tee "$out/gpu-check.log"
    rm -rf "$work";;
  smoke)
    cargo build --release -q --bin bake --example prompt_tokens
    mkdir -p "$carry/smoke"
    cp "$BAKE_SMOLLM2/tokenizer.json" "$carry/smoke/tokenizer.json"
    ./target/release/examples/prompt_tokens "$carry/smoke/tokenizer.json" 30 > "$carry/smoke/prompts.json"
    work=$(mktemp -d) out=${OUT:-$(mktemp -d)}
    "$BAKE_PYTHON" scripts/gpu/check.py --smoke --bake target/release/bake --carry "$carry/smoke" --work "$work" \
      --out "$out" | tail -n +1 > "$out/gpu-check.log"
    rm -rf "$work"
    "$BAKE_PYTHON" -c 'import json, sys; r = json.load(open(sys.argv[1]))
bad = [k for k, v in r.items() if isinstance(v, dict) and "error" in v]
print("smoke:", "failed sections " + ", ".join(bad) if bad else "every section ran", "->", sys.argv[1])
sys.exit(1 if bad else 0)' "$out/gpu-check.json";;
  *) echo "usage: scripts/gpu-check.sh prepare|run|smoke" >&2; exit 2;;
esac
