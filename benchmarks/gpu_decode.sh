#!/usr/bin/env bash
# Decode-step sweep at Step-3 layer shapes on one GPU (H100 80GB): bf16 / fp8 / fp8+kv8, the
# FP8 GEMM forms, the device copy bandwidth and the compiled HLO of the must-have pair.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_decode.sh OUT_DIR
# 5 MoE layers: 5 x 11.1 GB bf16 + 3.7 GB embed/head + <= 5.4 GB KV fits 80 GB; the same layer
# count runs in every mode so they compare.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_decode}}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace (pyproject package-dir)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
nvidia-smi --query-gpu=name,memory.total,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/bench_decode.py --config step3 --layers 5 --gemm-forms \
  --pairs 128:4096,1:4096,32:4096,256:4096,128:8192,128:1024 \
  --precision bf16,fp8,fp8+kv8 --steps 10 --budget-s "${BUDGET_S:-330}" \
  --hlo-dir "$OUT" --out "$OUT/decode_step3_h100.json" 2>&1 | tee "$OUT/decode.log" | grep -v "^W0\|^I0"
# Optional: the Pallas kernel APIs (attention "auto", grouped MoE) at the must-have pair.
timeout "${EXTRA_S:-100}" python3 benchmarks/bench_decode.py --config step3 --layers 5 \
  --pairs 128:4096 --precision bf16,fp8+kv8 --attention auto --moe grouped --steps 10 \
  --out "$OUT/decode_step3_h100_kernels.json" 2>&1 | tail -n 4 | cut -c1-2000
ls -la "$OUT"
