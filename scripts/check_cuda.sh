#!/usr/bin/env bash
# Compiles kernels/*.cu with nvcc and syntax-checks the CUDA glue csrc/*_cuda.cpp against torch's headers.
# Needs nvcc, not a GPU. The CPU torch wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h, which
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips (it only matters on Windows). Usage: scripts/check_cuda.sh [python]
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in kernels/*.cu; do
  [ -e "$f" ] || continue
  echo "nvcc -c $f"
  nvcc -std=c++17 -O3 -arch=sm_90 -Ikernels -c "$f" -o "$out/$(basename "$f").o"
done
inc=$("$PY" -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-isystem' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
cuda_inc=${CUDA_HOME:-/usr/local/cuda}/include
for f in csrc/*_cuda.cpp; do
  [ -e "$f" ] || continue
  echo "g++ -fsyntax-only $f"
  g++ -std=c++17 -fsyntax-only -DVITFAST_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $inc -I"$cuda_inc" -Ikernels "$f"
done
echo "CUDA sources compile"
