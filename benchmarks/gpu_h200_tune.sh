#!/usr/bin/env bash
# H200 tuning run for both Pallas kernels (issues #5 and #6) in ONE bounded GPU call.
#
#   bash benchmarks/gpu_h200_tune.sh OUT_DIR          # on the GPU machine, repo root
#   bash benchmarks/gpu_h200_tune.sh --dry OUT_DIR    # CPU plumbing check (tiny shapes, XLA)
#
# Steps, each under its own `timeout` so one hung compile cannot eat the call:
#  (a) GPU tests, four pytest processes at once (compiles are CPU-bound, the GPU work is tiny):
#      grouped GEMM FP8 cases | SwiGLU, bf16 and the in-place pool test | the two moe_ffn tests
#      | the MFA suite with the device's tuned config (TestPallasGPU).
#  (b) grouped-GEMM config sweep at T in MOE_TOKENS (E=48, checked against XLA at the first T),
#      then the whole MoE layer (routed + shared) at the same T with the sweep's best config.
#  (c) MFA decode variants (those of VARIANTS matching MFA_ONLY, plus MFA_EXTRA names of
#      EXTRA_VARIANTS) at 128x4K, 32x32K, 8x32K, then a pallas
#      sweep B in {1,32,128,256} x ctx {4K,32K} with the fastest FP8 / bf16 variant.
# Files in OUT_DIR: probe.txt, tests.txt, bench_moe.txt, moe_results.json, bench_mfa.txt,
# mfa_decode_<device>.json.
# Env: GIT_COMMIT (recorded in both JSONs: the GPU copy of the tree has no .git),
# TEST_TIMEOUT (100), MOE_TIMEOUT (175), MFA_TIMEOUT (200) seconds; MOE_TOKENS, MOE_CONFIGS,
# MFA_SHAPES, MFA_BATCHES, MFA_CONTEXTS, MFA_ONLY, MFA_EXTRA override the sweep sets.
set -u
USAGE_LINES=2,19
# shellcheck source=benchmarks/gpu_script_setup.sh
source "$(dirname "$0")/gpu_script_setup.sh"

MOE_TOKENS=${MOE_TOKENS:-64,512,2048,8192}
MOE_CONFIGS=${MOE_CONFIGS:-wg1_64x128_s3,wg1_64x128_s4,wg1_64x128_s6,wg2n_64x256_s4,wg2m_128x128_s4,wg2m_128x128_s6}
MFA_SHAPES=${MFA_SHAPES:-128x4096,32x32768,8x32768}
MFA_BATCHES=${MFA_BATCHES:-1,32,128,256}
MFA_CONTEXTS=${MFA_CONTEXTS:-4096,32768}
MFA_IMPLS=pallas_fp8,pallas_bf16
# The FP8 candidates: the tuned default (q by TMA + ring epilogue) and the previous default.
MFA_ONLY=${MFA_ONLY:-stages=4,q_in_kernel]|q_tma,ring_epi]|pallas_bf16}
MFA_EXTRA=${MFA_EXTRA:-}
if [ "$DRY" = 1 ]; then
  export BENCH_DRY=1  # bench_moe: D=F=256 and the XLA path
  MOE_TOKENS=64,128 MFA_SHAPES=2x256 MFA_BATCHES=1 MFA_CONTEXTS=256 MFA_IMPLS=xla_fp8,xla_bf16
  PYTEST_EXTRA=--collect-only
fi

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  $PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1; } > "$OUT/probe.txt"
stamp "probe: $(tr '\n' ' ' < "$OUT/probe.txt" | cut -c1-200)"

# (a) tests: four processes at once, per-test lines (-v) so a timeout still leaves results.
GG=tests/pallas_kernels/test_grouped_gemm.py
MF=tests/pallas_kernels/test_mfa_decode.py
TMP=$(mktemp -d)
run_tests() {  # name, pytest args...
  local name=$1; shift
  timeout -k 5 "${TEST_TIMEOUT:-100}" $PY -m pytest -v -m gpu -p no:cacheprovider \
    ${PYTEST_EXTRA:-} "$@" > "$TMP/$name.txt" 2>&1
  echo "rc=$?" >> "$TMP/$name.txt"
}
run_tests gg_fp8 "$GG" -k "test_grouped_matmul_fp8" &
run_tests gg_misc "$GG" -k "swiglu or matmul_bf16 or in_place_from_a_pool" &
run_tests gg_moe "$GG" -k "moe_ffn_fp8_expert or moe_ffn_bf16_and_shared" &
run_tests mfa_tuned "$MF" -k "TestPallasGPU and not HeadSplit and not QInKernel and not RingEpilogue" &
wait
: > "$OUT/tests.txt"
for n in gg_fp8 gg_misc gg_moe mfa_tuned; do
  { echo "===== $n"; cat "$TMP/$n.txt"; } >> "$OUT/tests.txt"
  stamp "tests $n: $(grep -cE ' PASSED' "$TMP/$n.txt") passed, \
$(grep -cE ' (FAILED|ERROR)' "$TMP/$n.txt") failed, $(tail -1 "$TMP/$n.txt")"
done
grep -E " (FAILED|ERROR)|^E  " "$OUT/tests.txt" | head -15
rm -rf "$TMP"

# (b) grouped GEMM: config sweep, then the whole layer at the same T (E=48 only, no baselines).
timeout -k 5 "${MOE_TIMEOUT:-175}" $PY benchmarks/bench_moe.py --out "$OUT/moe_results.json" \
  --shards 48 --tokens "$MOE_TOKENS" --sweep-tokens "$MOE_TOKENS" --baseline-tokens "" \
  --sweep-configs "$MOE_CONFIGS" > "$OUT/bench_moe.txt" 2>&1
stamp "bench_moe rc=$?"
grep -E '^\{' "$OUT/bench_moe.txt" | cut -c1-260 | tail -40

# (c) MFA decode: variants at the target shapes, then the sweep with the fastest variant.
timeout -k 5 "${MFA_TIMEOUT:-200}" $PY benchmarks/bench_mfa_decode.py --out "$OUT" \
  --variants "$MFA_SHAPES" --extra-variants "$MFA_EXTRA" --only-variants "$MFA_ONLY" \
  --config-from-variants \
  --batches "$MFA_BATCHES" --contexts "$MFA_CONTEXTS" --impls "$MFA_IMPLS" \
  > "$OUT/bench_mfa.txt" 2>&1
stamp "bench_mfa rc=$?"
grep -E '^\{' "$OUT/bench_mfa.txt" | cut -c1-220 | tail -60
stamp done
