#!/usr/bin/env bash
# GPU check of the MFA decode kernel's v_convert="memory" mode (the FP8 default) in ONE call.
#
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_vconvert_check.sh OUT_DIR
#   bash benchmarks/gpu_vconvert_check.sh --dry OUT_DIR   # CPU plumbing check (XLA rows only)
#
# Steps, each under its own `timeout`:
#  (0) plumbing: api._kernel_shape must hand TuningConfig.v_convert to the kernel; if not, the
#      variants below would silently time the default, so the script stops (rc 3).
#  (1) ptxas register/spill report (MOSAIC_GPU_DUMP_PTXAS=1) of one compile of the default and
#      of the new mode (B=2, 4K), in the background while (2) runs.
#  (2) GPU suite with the new config: pytest -k VConvertMemory -n 4 (TEST_TIMEOUT, 150 s).
#  (3) bench_mfa_decode.py: the tuned FP8 default and the two vcvt_mem variants at 128x4K and
#      32x32K, plus the pallas_fp8 row at B=128 4K (BENCH_TIMEOUT, 150 s).
# Files in OUT_DIR: probe.txt, ptxas.txt, tests.txt, bench.txt, mfa_decode_<device>.json.
# Env: GIT_COMMIT (recorded in the JSON: the GPU copy of the tree has no .git).
set -u
USAGE_LINES=2,16
# shellcheck source=benchmarks/gpu_script_setup.sh
source "$(dirname "$0")/gpu_script_setup.sh"

# Time all extra variants' candidates but keep only the tuned default (...,q_tma,ring_epi]) and
# the two vcvt_mem variants, by substring.
ONLY="q_tma,ring_epi]|vcvt_mem]"
SHAPES=128x4096,32x32768 IMPLS=pallas_fp8 PYTEST_EXTRA=""
if [ "$DRY" = 1 ]; then
  SHAPES=2x256 IMPLS=xla_fp8 PYTEST_EXTRA=--collect-only
fi

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  $PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1; } > "$OUT/probe.txt"
stamp "probe: $(tr '\n' ' ' < "$OUT/probe.txt" | cut -c1-200) commit=$GIT_COMMIT"

# (0) the config field must reach the kernel (api.py), else everything below tests the default.
timeout -k 5 60 $PY - <<'EOF'
import sys
import jax
import jax.numpy as jnp
from step3_jax.kernels.mfa_decode import TuningConfig, api

sd = jax.ShapeDtypeStruct
cfg = TuningConfig(wg_split="seq", num_stages=4, q_quant="kernel", q_tma=True,
                   ring_epilogue=True, v_convert="memory")
kv = sd((2, 4096, 256), jnp.float8_e4m3fn)
ks = api._kernel_shape(sd((2, 1, 64, 256), jnp.bfloat16), kv, sd((2,), jnp.int32), None,
                       256**-0.5, cfg, 132)
print("kernel shape v_convert:", ks.v_convert)
sys.exit(0 if ks.v_convert == "memory" else 3)
EOF
RC=$?
if [ $RC -ne 0 ]; then
  stamp "STOP: api._kernel_shape does not pass v_convert on (rc=$RC): add v_convert=config.v_convert"
  exit 3
fi

# (1) ptxas report in the background (register use per kernel, spill stores/loads).
ptxas_report() {
  MOSAIC_GPU_DUMP_PTXAS=1 timeout -k 5 120 $PY - > "$OUT/ptxas.txt" 2>&1 <<'EOF'
import dataclasses
import jax
import jax.numpy as jnp
from step3_jax.kernels.mfa_decode import TuningConfig, mfa_decode_attention
from step3_jax.quant import quantize_kv

base = TuningConfig(wg_split="seq", num_stages=4, q_quant="kernel", q_tma=True,
                    ring_epilogue=True)
kk, kv, kq = jax.random.split(jax.random.key(0), 3)
(k, ks), (v, vs) = (quantize_kv(jax.random.normal(x, (2, 4096, 256), jnp.bfloat16))
                    for x in (kk, kv))
q = jax.random.normal(kq, (2, 1, 64, 256), jnp.bfloat16)
for mode in ("compute", "memory"):
    print(f"===== v_convert={mode}", flush=True)
    cfg = dataclasses.replace(base, v_convert=mode, num_splits=1)
    out = mfa_decode_attention(q, k, v, jnp.full((2,), 4000, jnp.int32), k_scale=ks,
                               v_scale=vs, implementation="pallas", config=cfg)
    jax.block_until_ready(out)
    print(f"===== v_convert={mode} done", flush=True)
EOF
  echo "rc=$?" >> "$OUT/ptxas.txt"
}
if [ "$DRY" = 0 ]; then ptxas_report & PTXAS_PID=$!; fi

# (2) GPU suite with the new config (per-test lines: a timeout still leaves results).
timeout -k 5 "${TEST_TIMEOUT:-150}" $PY -m pytest -v -m gpu -p no:cacheprovider $PYTEST_EXTRA \
  tests/pallas_kernels/test_mfa_decode.py -k "VConvertMemory" -n 4 > "$OUT/tests.txt" 2>&1
echo "rc=$?" >> "$OUT/tests.txt"
stamp "tests: $(grep -cE ' PASSED' "$OUT/tests.txt") passed, \
$(grep -cE ' (FAILED|ERROR)' "$OUT/tests.txt") failed, $(tail -1 "$OUT/tests.txt")"
grep -E " (FAILED|ERROR)|^E  " "$OUT/tests.txt" | head -15
if [ "$DRY" = 0 ]; then
  wait "$PTXAS_PID"
  stamp "ptxas: $(tail -1 "$OUT/ptxas.txt")"
  grep -E "=====|[Ss]pill|registers" "$OUT/ptxas.txt" | sort | uniq -c | head -20
fi

# (3) default vs new mode, side by side, same run.
timeout -k 5 "${BENCH_TIMEOUT:-150}" $PY benchmarks/bench_mfa_decode.py --out "$OUT" \
  --variants "$SHAPES" --extra-variants all --only-variants "$ONLY" \
  --batches 128 --contexts 4096 --impls "$IMPLS" > "$OUT/bench.txt" 2>&1
stamp "bench rc=$?"
$PY - "$OUT" <<'EOF'
import glob, json, sys
for path in glob.glob(sys.argv[1] + "/mfa_decode_*.json"):
    res = json.load(open(path))
    print(path, "commit", res.get("commit"), "copy GB/s", res.get("copy_GBps"))
    for r in res.get("variants", []) + res.get("rows", []):
        print(f"  {r['name']:70s} {r['shape']['B']:4d}x{r['shape']['ctx']:<6d}",
              r.get("time_us", ""), "us", r.get("GBps", ""), "GB/s", r.get("error", "")[:160])
EOF
stamp done
