#!/usr/bin/env bash
# One GPU call for issue #5's attention half: (1) the FP8 NumPy-reference tests of tests/quant with
# --runxfail (the TF32 fix of the former GPU known gap: they must PASS, not just xpass), (2) the
# GPU tests of the 'pallas' FP8 linear, (3) the attention half of a Step-3 layer (CUPTI per-kernel
# device time + wall clock) at B=128 x 4K and B=64 x 8K, then a compact summary.
# Usage (repo root): GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_attention_layer.sh OUT
# Budgets (seconds, env): TEST_TIMEOUT=100, BENCH_TIMEOUT=290 (fits a 420 s call), PAIRS=128:4096,64:8192.
set -u
OUT=${1:-/tmp/attention_layer}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace (pyproject package-dir)
export XLA_PYTHON_CLIENT_PREALLOCATE=false GIT_COMMIT=${GIT_COMMIT:-unknown}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -rfE -p no:cacheprovider -n 4 --runxfail \
  tests/quant > "$OUT/tests_quant.txt" 2>&1
echo "tests/quant --runxfail rc=$?"
grep -E "passed|failed|^FAILED|^ERROR|^E  " "$OUT/tests_quant.txt" | tail -20
timeout "${BENCH_TIMEOUT:-290}" python3 benchmarks/bench_attention_layer.py \
  --pairs "${PAIRS:-128:4096,64:8192}" --out "$OUT/attention_layer.json" > "$OUT/attn.txt" 2>&1
echo "attention bench rc=$?"; tail -3 "$OUT/attn.txt" | cut -c1-300
python3 - "$OUT/attention_layer.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print({k: v for k, v in d.items() if k != "rows"})
for r in d["rows"]:
    name = f'{r["batch"]}x{r["context"]} {r.get("name", r["mode"])}'
    name += f' ({r["mode"]} {r.get("gemm", "")}/{r["granularity"]}, attn={r["attention"]})'
    if "error" in r:
        print(name, "ERROR", r["error"][:200])
        continue
    print(f'{name}: device {r["time_us"]} us ({r["timer"]}), wall {r["host_us"]} us, '
          f'{r["GBps"]} GB/s, {r["pct_of_copy"]}% of copy')
    for n, t in r.get("kernels_us", [])[:6]:
        print("    ", t, n)
PY
