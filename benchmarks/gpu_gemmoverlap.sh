#!/usr/bin/env bash
# One GPU call for the FP8 wgmma/promotion overlap (docs/log/gemmoverlap.md):
# 1. correctness of every overlap kernel vs the float32 oracle and its plain twin (pytest),
# 2. what ptxas says (serialized wgmma? spills? DEPBAR waits) at Step-3 shapes,
# 3. gate/up + down timings, overlap vs plain twins, E=48 at T = 2048, 8192, 256.
# Results: $OUT/pytest_overlap.txt, $OUT/ptxas/*.log, $OUT/ptxas_summary.txt,
#          $OUT/moe_overlap.json, $OUT/bench_stdout.txt
# Usage (repo root, GPU machine): OUT=/some/dir bash benchmarks/gpu_gemmoverlap.sh
set -u
OUT=${OUT:-/tmp/gemmoverlap_out}
mkdir -p "$OUT/ptxas"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -m gpu -k overlap \
  tests/pallas_kernels/test_grouped_gemm.py > "$OUT/pytest_overlap.txt" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|^E  |Error" "$OUT/pytest_overlap.txt" | head -20
timeout "${PTXAS_TIMEOUT:-90}" python3 benchmarks/ptxas_overlap_check.py --dump "$OUT/ptxas" \
  > "$OUT/ptxas_summary.txt" 2>&1
echo "ptxas check rc=$?"
grep -v '^{' "$OUT/ptxas_summary.txt" | cut -c1-300 | tail -12
CONFIGS=wg2n_64x256_s4,wg2n_64x256_s4_ov,wg2n_64x256_s4_ovp
CONFIGS=$CONFIGS,wg2m_128x128_s4,wg2m_128x128_s4_ov,wg2m_128x128_s4_ovp
CONFIGS=$CONFIGS,wg1_64x128_s4,wg1_64x128_s4_ov,wg1_64x128_s4_ovp
timeout "${BENCH_TIMEOUT:-170}" python3 benchmarks/bench_moe.py --out "$OUT/moe_overlap.json" \
  --shards 48 --tokens "" --baseline-tokens "" --sweep-tokens 2048,8192,256 \
  --sweep-configs "${SWEEP_CONFIGS:-$CONFIGS}" > "$OUT/bench_stdout.txt" 2>&1
echo "bench rc=$?"
grep -vE "^\s*$" "$OUT/bench_stdout.txt" | cut -c1-260 | tail -30
