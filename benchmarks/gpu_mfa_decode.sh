#!/usr/bin/env bash
# One-call GPU run for the MFA decode kernel: GPU tests, then the benchmark sweep.
#   bash benchmarks/gpu_mfa_decode.sh OUT_DIR [quick|full]
# Writes OUT_DIR/{probe.txt,tests.txt,tests_other_split.txt,bench.txt,mfa_decode_<device>.json}.
# Env: TEST_TIMEOUT, BENCH_TIMEOUT (seconds), BENCH_ARGS (extra benchmark flags),
# GIT_COMMIT (recorded in the JSON when the GPU copy of the tree has no .git).
set -u
OUT=${1:-/tmp/mfa_out}; MODE=${2:-quick}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace (pyproject package-dir)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
T=tests/pallas_kernels/test_mfa_decode.py
python3 -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/probe.txt" 2>&1
# Each suite has its own timeout: a hung kernel must not eat the whole call.
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider "$T" \
  -k "not HeadSplit and not QInKernel" > "$OUT/tests.txt" 2>&1
echo "tests (tuned configs) rc=$?"; tail -3 "$OUT/tests.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider "$T" \
  -k "HeadSplit or QInKernel" > "$OUT/tests_other_split.txt" 2>&1
echo "tests (other split, q in kernel) rc=$?"; tail -3 "$OUT/tests_other_split.txt"
if [ "$MODE" = quick ]; then ARGS="--batches 1,32,128 --contexts 4096,32768"; else ARGS=""; fi
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_mfa_decode.py --out "$OUT" $ARGS \
  ${BENCH_ARGS:-} > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"; grep -v "^cupti" "$OUT/bench.txt" | tail -40
