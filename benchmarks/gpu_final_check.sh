#!/usr/bin/env bash
# One H100 call: the whole test suite on the GPU, then the attention half of a Step-3 layer with
# CUPTI per-kernel times. Usage: bash benchmarks/gpu_final_check.sh OUT
set -u
OUT=${1:-/tmp/final}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace (pyproject package-dir)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name --format=csv,noheader
timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -rfE -p no:cacheprovider -n 8 tests \
  > "$OUT/tests_gpu.txt" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|^FAILED|^ERROR|^E  " "$OUT/tests_gpu.txt" | tail -25
timeout "${BENCH_TIMEOUT:-170}" python3 benchmarks/bench_attention_layer.py --pairs 128:4096 \
  --out "$OUT/attention_layer.json" > "$OUT/attn.txt" 2>&1
echo "attention bench rc=$?"
python3 - "$OUT/attention_layer.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    print({k: v for k, v in r.items() if k != "kernels_us"})
    for n, t in r.get("kernels_us", [])[:8]:
        print("    ", t, n)
PY
