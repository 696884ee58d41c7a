#!/usr/bin/env bash
# One GPU call: Pallas grouped-GEMM tests on the GPU, then the MoE benchmark sweep.
# Usage (repo root, GPU machine): OUT=/some/dir bash benchmarks/gpu_moe.sh [tokens] [shards]
set -u
OUT=${OUT:-/tmp/moe_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
TOKENS=${1:-64,128,256,512,1024,2048,4096,8192}
SHARDS=${2:-48,16,24}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 240 python3 -m pytest -q -x tests/pallas_kernels/test_grouped_gemm.py -k pallas \
  > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest rc=$?"; tail -25 "$OUT/pytest_gpu.txt"
python3 benchmarks/bench_moe.py --tokens "$TOKENS" --shards "$SHARDS" \
  --out "$OUT/moe_results.json" 2>&1 | tail -40
