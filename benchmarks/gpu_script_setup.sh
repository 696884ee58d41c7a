# Sourced by the one-call GPU scripts (gpu_h200_tune.sh, gpu_vconvert_check.sh) after they set
# USAGE_LINES, the sed range of their header comment. Handles `-h|--help`, `--dry` (sets
# DRY=1) and the one OUT_DIR argument (OUT, created), installs the tree (editable, no deps), exports GIT_COMMIT
# (recorded in the JSONs: the GPU copy of the tree has no .git), and defines PY and stamp.
usage() { sed -n "${USAGE_LINES}p" "$0" | sed 's/^# \{0,1\}//'; }
DRY=0
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --dry) DRY=1; shift ;;
esac
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
OUT=$1
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1  # step3_jax.* namespace (pyproject package-dir)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export GIT_COMMIT=${GIT_COMMIT:-unknown}
PY=${PYTHON:-python3}
START=$(date +%s)
stamp() { echo "[$(($(date +%s) - START)) s] $*"; }
