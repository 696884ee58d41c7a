#!/usr/bin/env bash
# One-call GPU run for the MFA decode kernel: API probe, GPU tests, benchmark sweep.
#   bash benchmarks/gpu_mfa_decode.sh OUT_DIR [quick|full]
# Writes OUT_DIR/{probe.txt,tests*.txt,bench.txt,mfa_decode_<device>.json}.
# Env: TEST_TIMEOUT, BENCH_TIMEOUT (seconds), BENCH_ARGS (extra benchmark flags).
set -u
OUT=${1:-/tmp/mfa_out}; MODE=${2:-quick}
mkdir -p "$OUT"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
T=tests/pallas_kernels/test_mfa_decode.py
python3 -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/probe.txt" 2>&1
# 1. Quick check of the "seq" warpgroup split (a hang must not eat the whole call).
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider "$T" \
  -k "SeqSplit and ragged" > "$OUT/tests_seq_probe.txt" 2>&1
SEQ_OK=$?; echo "seq probe rc=$SEQ_OK"; tail -3 "$OUT/tests_seq_probe.txt"
# 2. The GPU suite (default config), then the seq-split suite if the probe passed.
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider "$T" \
  -k "not SeqSplit" > "$OUT/tests.txt" 2>&1
echo "tests rc=$?"; tail -4 "$OUT/tests.txt"
SPLIT=head; VARIANTS="128x4096,8x32768"
if [ "$SEQ_OK" = 0 ]; then
  SPLIT=seq
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider "$T" \
    -k "SeqSplit" > "$OUT/tests_seq.txt" 2>&1
  echo "seq tests rc=$?"; tail -4 "$OUT/tests_seq.txt"
else
  BENCH_ARGS="${BENCH_ARGS:-} --variants="
fi
# 3. Benchmarks: variants side by side, then the sweep.
if [ "$MODE" = quick ]; then ARGS="--batches 1,32,128 --contexts 4096,32768"; else ARGS=""; fi
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_mfa_decode.py --out "$OUT" $ARGS \
  --fp8-split "$SPLIT" ${BENCH_ARGS:-} > "$OUT/bench.txt" 2>&1
echo "bench rc=$? split=$SPLIT"; grep -v "^cupti" "$OUT/bench.txt" | tail -40
