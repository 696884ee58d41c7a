#!/usr/bin/env bash
# The Step3-VL vision tower benchmark (issue 18) on ONE GPU, in one call.
#
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_vision.sh OUT_DIR
#   bash benchmarks/gpu_vision.sh --dry OUT_DIR   # CPU plumbing check (tiny config)
#
# Steps, each under its own `timeout`:
#  (1) the vision tests on the GPU (tests/vision, incl. the torch position-resize check).
#  (2) bench_vision.py, real size, one 728 x 728 view: JAX bf16 (cuDNN and XLA attention), the
#      torch/cuDNN twin on the same weights (time + output cosine), JAX FP8 linears (default
#      policy: the Pallas FP8 GEMM where it applies).
#  (3) the same with the XLA (dequantize) FP8 GEMM, and one 504 x 504 crop (bf16 + FP8).
# Files in OUT_DIR: probe.txt, tests.txt, vision_728.json, vision_728_xla_fp8.json,
# vision_504.json, bench.txt.
set -u
USAGE_LINES=2,13
# shellcheck source=benchmarks/gpu_script_setup.sh
source "$(dirname "$0")/gpu_script_setup.sh"

EXTRA="" ITERS=10
if [ "$DRY" = 1 ]; then EXTRA="--tiny" ITERS=2; fi

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  $PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1; } > "$OUT/probe.txt"
stamp "probe: $(tr '\n' ' ' < "$OUT/probe.txt" | cut -c1-200) commit=$GIT_COMMIT"

timeout -k 5 "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:xdist tests/vision > "$OUT/tests.txt" 2>&1
stamp "tests rc=$? $(tail -1 "$OUT/tests.txt")"

run() {  # name, args...
  local name=$1; shift
  timeout -k 5 300 $PY benchmarks/bench_vision.py $EXTRA --iters $ITERS --out "$OUT/$name.json" "$@" \
    >> "$OUT/bench.txt" 2>&1
  stamp "$name rc=$? $(tail -1 "$OUT/bench.txt" | cut -c1-300)"
}
run vision_728 --size 728 --fp8-gemm auto
run vision_728_xla_fp8 --size 728 --fp8-gemm xla --no-torch
run vision_504 --size 504 --fp8-gemm auto --no-torch
