#!/usr/bin/env bash
# Builds bake with the `cuda` feature on a machine without a GPU (see ../shared/docs/cuda_build.md): installs
# the CUDA 13.0 toolchain from PyPI once, compiles, and packs the stripped binary for the device machine.
#
# Usage: scripts/build-cuda.sh [SHARED_DIR]
# Output: target/cuda/release/bake (its own target folder: the CPU build in target/release stays as it is)
# and target/gpu-carry/bake.xz (stripped, xz-compressed: the device tool carries at most 64 MiB).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=$(cd "${1:-${BAKE_SHARED:-$repo/../shared}}" && pwd)
toolchain=${BAKE_CACHE:-$HOME/.cache/bake}/cuda13
cd "$repo"
if [ ! -x "$toolchain/nvidia/cu13/bin/nvcc" ]; then
  cargo fetch --locked >&2   # the stub for libcuda.so is generated from cudarc's sources
  PIP_NO_CACHE_DIR=1 "$shared/tools/setup_cuda13.sh" "$toolchain" >&2
fi
root=$toolchain/nvidia/cu13
export CUDA_ROOT=$root CUDA_HOME=$root PATH=$root/bin:$PATH
# No GPU here to ask: 90 is the H100/H200 of the lent machines (nvcc emits sm_90a PTX, JIT-compiled there).
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
# Only the stub libcuda is here; the real driver is on the GPU machine.
export LIBRARY_PATH=$root/lib/stubs:$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
# Warnings in code only the CUDA build compiles fail here as the CPU build's do under clippy.
RUSTFLAGS="${RUSTFLAGS:-} -D warnings" cargo build --release --locked --features cuda --bin bake --target-dir target/cuda
mkdir -p target/gpu-carry
strip -o target/gpu-carry/bake target/cuda/release/bake
xz -T0 -6 -f target/gpu-carry/bake
ls -l target/gpu-carry/bake.xz >&2
