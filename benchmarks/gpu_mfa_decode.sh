#!/usr/bin/env bash
# One-call GPU run for the MFA decode kernel: API probe, GPU tests, benchmark sweep.
#   bash benchmarks/gpu_mfa_decode.sh OUT_DIR [quick|full]
# Writes OUT_DIR/{probe.txt,tests.txt,bench.txt,mfa_decode_<device>.json}.
set -u
OUT=${1:-/tmp/mfa_out}; MODE=${2:-quick}
mkdir -p "$OUT"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 - > "$OUT/probe.txt" 2>&1 <<'PY'
import jax, jax.experimental.pallas.mosaic_gpu as plgpu
print(jax.__version__, jax.devices())
print([n for n in dir(plgpu) if not n.startswith("_")])
PY
timeout "${SMOKE_TIMEOUT:-90}" python3 benchmarks/_mfa_smoke.py > "$OUT/smoke.txt" 2>&1
echo "smoke rc=$?"; tail -c 3000 "$OUT/smoke.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/pallas_kernels/test_mfa_decode.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.txt"
if [ "$MODE" = quick ]; then
  ARGS="--batches 1,32,128 --contexts 4096,32768 --impls pallas_fp8,pallas_bf16,xla_fp8,xla_bf16,jax_triton_example_bf16,torch_sdpa_bf16,cudnn_bf16"
else
  ARGS=""
fi
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_mfa_decode.py --out "$OUT" $ARGS \
  ${BENCH_ARGS:-} > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"; grep -v "^cupti" "$OUT/bench.txt" | tail -60
