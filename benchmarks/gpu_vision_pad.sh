#!/usr/bin/env bash
# Issue 18: the vision tower's token padding and cuBLAS GEMMs, on ONE GPU, in one call (~6 min).
#
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_vision_pad.sh OUT_DIR
#   bash benchmarks/gpu_vision_pad.sh --dry OUT_DIR   # CPU plumbing check (tiny config)
#
# Steps, each under its own `timeout`:
#  (1) tests/vision/test_vision_padding.py on the GPU (incl. the cuDNN padding-mask tests).
#  (2) bench_vision.py, real size, one 728 x 728 view, bf16, with a profiler trace, three ways
#      in the same process family so the numbers compare: the default (tokens padded 2708 ->
#      2712, cuBLAS GEMMs), unpadded with cuBLAS GEMMs (XLA pads every GEMM operand), and
#      unpadded with XLA's Triton GEMM fusions (the earlier default).
# Files in OUT_DIR: probe.txt, tests.txt, vision_728_pad8.json, vision_728_nopad_cublas.json,
# vision_728_nopad_triton.json, bench.txt.
set -u
USAGE_LINES=2,14
# shellcheck source=benchmarks/gpu_script_setup.sh
source "$(dirname "$0")/gpu_script_setup.sh"

EXTRA="" ITERS=5
if [ "$DRY" = 1 ]; then EXTRA="--tiny" ITERS=2; fi

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  $PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1; } > "$OUT/probe.txt"
stamp "probe: $(tr '\n' ' ' < "$OUT/probe.txt" | cut -c1-200) commit=$GIT_COMMIT"

timeout -k 5 "${TEST_TIMEOUT:-120}" $PY -m pytest -q -p no:xdist tests/vision/test_vision_padding.py \
  > "$OUT/tests.txt" 2>&1
stamp "tests rc=$? $(tail -1 "$OUT/tests.txt")"

run() {  # name, args...
  local name=$1; shift
  timeout -k 5 150 $PY benchmarks/bench_vision.py $EXTRA --iters $ITERS --size 728 --no-torch \
    --no-fp8 --out "$OUT/$name.json" "$@" >> "$OUT/bench.txt" 2>&1
  stamp "$name rc=$? $(tail -1 "$OUT/bench.txt" | cut -c1-300)"
}
run vision_728_pad8 --trace
run vision_728_nopad_cublas --token-multiple 1 --trace
run vision_728_nopad_triton --token-multiple 1 --triton-gemm
