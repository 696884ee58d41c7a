#!/usr/bin/env bash
# Run many benchmark commands in ONE device call, each under its own time budget.
#
#   bash benchmarks/gpu_run.sh [-t SECONDS] OUT_DIR 'COMMAND' ['COMMAND' ...]
#
# Installs the tree (editable, no deps: the GPU machine has no network), prints the device,
# then runs each COMMAND with `bash -c` from the repository root under `timeout` (default
# -t 300 s each; a COMMAND starting with `@SECONDS ` has its own budget). Each command gets its
# own folder, exported as $OUT (OUT_DIR/NN), for its JSON; its stdout+stderr go to
# OUT_DIR/NN.log. OUT_DIR/summary.txt gets one line per command (rc, seconds, command) followed
# by the command's last stdout line (a benchmark's JSON summary). Quote $OUT in single quotes so
# that the command, not this shell, expands it:
#
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_run.sh -t 240 /tmp/o \
#     'python3 benchmarks/harness.py' \
#     '@400 python3 benchmarks/bench_mfa_decode.py --out $OUT --variants "" --batches 1,8' \
#     'python3 benchmarks/bench_moe.py --out $OUT/moe.json --shards 16 --tokens 256,512'
#
# Env: GIT_COMMIT (recorded in the JSONs: the GPU copy of the tree has no .git), PYTHON
# (python3), SKIP_INSTALL=1 (no pip step: a CPU dry run from a venv), ARCHIVE=1 (at the end,
# OUT_DIR becomes one OUT_DIR.tgz: the device tool returns only a few files per call).
set -u
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
BUDGET=300
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  -t) BUDGET=$2; shift 2 ;;
esac
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd); shift
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}  # torch shares the GPU
export GIT_COMMIT=${GIT_COMMIT:-}  # empty: provenance falls back to git, else "unknown"
export PATH="$(dirname "$(command -v "$PY")"):$PATH"  # `python3` in a COMMAND is $PY's
START=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
  echo "commit $GIT_COMMIT"; } | tee "$OUT_DIR/device.txt"
: > "$OUT_DIR/summary.txt"
i=0
for CMD in "$@"; do
  i=$((i + 1)); NN=$(printf %02d "$i"); T=$BUDGET
  if [[ $CMD =~ ^@([0-9]+)[[:space:]]+(.*)$ ]]; then T=${BASH_REMATCH[1]}; CMD=${BASH_REMATCH[2]}; fi
  export OUT="$OUT_DIR/$NN"; mkdir -p "$OUT"
  t0=$(date +%s)
  OUT=$OUT timeout -k 10 "$T" bash -c "$CMD" > "$OUT_DIR/$NN.log" 2>&1
  rc=$?
  line="[$NN] rc=$rc $(( $(date +%s) - t0 ))s (budget ${T}s, at $(( $(date +%s) - START ))s): $CMD"
  last=$(grep -E '^\{' "$OUT_DIR/$NN.log" | tail -n 1 | cut -c1-1500)
  { echo "$line"; echo "    ${last:-<no JSON line>}"; } | tee -a "$OUT_DIR/summary.txt"
  if [ "$rc" -ne 0 ]; then grep -vE '^\{|^[WI][0-9]{4}' "$OUT_DIR/$NN.log" | tail -n 5 | sed 's/^/    /'; fi
done
echo "all done in $(( $(date +%s) - START ))s; files under $OUT_DIR"
if [ "${ARCHIVE:-0}" = 1 ]; then
  tar czf "$OUT_DIR.tgz" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")" && rm -rf "$OUT_DIR" \
    && echo "archived to $OUT_DIR.tgz"
fi
