#!/usr/bin/env bash
# One GPU call: Pallas grouped-GEMM tests on the GPU, then the MoE benchmark sweep
# (config sweep at a few T with a correctness check against the XLA path, then the whole
# layer for every T, EP shards, baselines). Results: $OUT/pytest_gpu.txt, $OUT/moe_results.json
# Usage (repo root, GPU machine): OUT=/some/dir bash benchmarks/gpu_moe.sh
set -u
OUT=${OUT:-/tmp/moe_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace (pyproject package-dir)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${TEST_TIMEOUT:-110}" python3 -m pytest -q -m gpu tests/pallas_kernels/test_grouped_gemm.py \
  > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|^E  |Error" "$OUT/pytest_gpu.txt" | head -20
timeout "${BENCH_TIMEOUT:-280}" python3 benchmarks/bench_moe.py --out "$OUT/moe_results.json" \
  "$@" > "$OUT/bench_stdout.txt" 2>&1
echo "bench rc=$?"
grep -vE "^\s*$" "$OUT/bench_stdout.txt" | cut -c1-330 | tail -45
