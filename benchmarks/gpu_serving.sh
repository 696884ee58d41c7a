#!/usr/bin/env bash
# Engine serving curve on one GPU at Step-3 layer shapes (random FP8 weights, FP8 paged KV):
# the bare fixed-batch decode step vs the engine under Poisson load (throughput, TTFT, TPOT
# p50/p99 per rate), JSON + plot. No HTTP (the GPU machine has no FastAPI): engine mode.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_serving.sh OUT_DIR
# LAYERS (default 4 MoE layers: 4 x 5.4 GB FP8 + embed/head + KV fits an H100), BATCH (64),
# RATES (requests/s), CONCURRENCY (closed-loop clients), DURATION (s per level), PROMPT_LEN and
# OUTPUT_LEN (token ranges, "lo:hi") override the defaults. The decode-bound check of the
# engine's overhead: RATES= CONCURRENCY=64 PROMPT_LEN=64:128 OUTPUT_LEN=256:512.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_serving}}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/bench_serving.py --step3 --layers "${LAYERS:-4}" --precision fp8+kv8 \
  --mode engine --max-batch "${BATCH:-64}" --max-len 4096 --page-size 64 --prefill-chunk 256 \
  --prompt-len "${PROMPT_LEN:-512:2048}" --output-len "${OUTPUT_LEN:-128:512}" \
  --rates "${RATES-2,4,8,16}" --concurrency "${CONCURRENCY:-}" \
  --duration "${DURATION:-30}" --bare-steps 20 --out "$OUT" 2>&1 | tee "$OUT/serving.log" \
  | grep -v "^W0\|^I0" | cut -c1-1500
ls -la "$OUT"
