#!/usr/bin/env bash
# AFD benchmark sweep on the GPU machine (one call). Usage: bash benchmarks/gpu_afd.sh OUT_DIR [LAYOUT]
# 2 GPUs: 1A1F; 4 GPUs: 1A3F. Each bench run is bounded so a hang cannot eat the budget.
set -u
OUT=${1:-/tmp/afd_out}; LAYOUT=${2:-1A1F}; LAYERS=${LAYERS:-10}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace (pyproject package-dir)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_afd.py --layout "$LAYOUT" --layers "$LAYERS" \
  --microbatch 128 --micro-batches "${MBS:-3,2}" --context 4096 --weights float8_e4m3fn \
  --ffn-impl grouped --baseline-batches "${BASE:-128,384}" --reps 10 \
  --out "$OUT/afd_${LAYOUT}.json" > "$OUT/bench_${LAYOUT}.log" 2>&1
echo "rc=$?"
grep -v '^{' "$OUT/bench_${LAYOUT}.log" | grep -iE "error|Error" | head -20
python3 - "$OUT/afd_${LAYOUT}.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "arena"})
for r in d["baseline"]:
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
for r in d["errors"]:
    print("ERR", r["name"], r["error"][:600])
PY
