#!/usr/bin/env bash
# Full 61-layer Step-3 as 1A3F on 4 H200 (one call): GPU checks of the in-place paths, then
# the AFD sweep and the DP+EP baseline at the same batches. Usage: bash benchmarks/gpu_afd_full.sh OUT
# Env: RUNS (MxBm list), BASE (per-GPU baseline batches), BENCH_TIMEOUT.
set -u
OUT=${1:-/tmp/afd_full}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace (pyproject package-dir)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
# The two in-place kernel paths, checked on two GPUs at once before they are relied on.
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/pallas_kernels/test_grouped_gemm.py -k pool > "$OUT/t_pool.txt" 2>&1 &
P1=$!
CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/pallas_kernels/test_mfa_decode.py -k "offsets and not HeadSplit" > "$OUT/t_offsets.txt" 2>&1 &
P2=$!
wait $P1; POOL=$?; wait $P2; OFFS=$?
echo "pool test rc=$POOL; page-offset tests rc=$OFFS"; tail -2 "$OUT/t_pool.txt" "$OUT/t_offsets.txt"
FLAGS=""
[ "$POOL" = 0 ] || FLAGS="$FLAGS --experts-copied"
if [ "$OFFS" = 0 ]; then FLAGS="$FLAGS --attention-impl pallas"; else FLAGS="$FLAGS --attention-impl xla"; fi
echo "bench flags:$FLAGS"
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_afd.py --full --layout 1A3F \
  --runs "${RUNS:-1x256,1x512,2x256}" --stage-runs 1 --cache float8_e4m3fn \
  --weights float8_e4m3fn --ffn-impl grouped --baseline-batches "${BASE:-64,128}" --reps 5 \
  --context 4096 $FLAGS --out "$OUT/afd_full_1A3F.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -iE "error|Traceback" "$OUT/bench.log" | head -10
python3 - "$OUT/afd_full_1A3F.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
skip = ("arena", "config")
for r in d["runs"] + d["baseline"]:
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in skip})
for r in d["errors"]:
    print("ERR", r["name"], r["error"][:800])
PY
