#!/usr/bin/env bash
# One scripted call on a lent GPU (shared/GPU.md): build for Hopper, run the tests natively, run the
# benchmarks, and leave logs, JSON and the markdown report under $OUT (default ./out).
# Usage on the device machine, from the repository root: bash bench/gpu_run.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$OUT/env.txt"
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -m pytest tests -q -x --durations=15 2>&1 | tee "$OUT/tests.log"
python3 -m pytest bench --benchmark-only -q --benchmark-json="$OUT/bench.json" 2>&1 | tail -40
python3 bench/report.py "$OUT/bench.json" --out "$OUT"
python3 -m vitfast --json "$OUT/main_job.json" | tail -30
