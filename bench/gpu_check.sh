#!/usr/bin/env bash
# One prepared device check for a bare, offline GPU machine (issue 12). Usage:
#
#   make gpu-pack                                   # here, once: builds gpu_pack/ (< 50 MiB, git-ignored)
#   OUT=/some/dir bash bench/gpu_check.sh           # there, with gpu_pack/ carried: budgeted to end < 9 min
#   bash bench/gpu_check.sh --dry-run               # anywhere, CPU, tiny sizes, < 3 min (tests run this)
#   bash bench/gpu_check.sh --only bench,grid       # setup + the named steps only (to rerun a step)
#
# Steps: setup (wheels onto PYTHONPATH, imports, env.json), pack (fp16 pack loads as exact fp32 through
# the harness), pytest (-m gpu: batched == loop on CUDA), bench (batched vs loop at N = 1, 8, 32, 128,
# with CUDA peak memory per N), grid (a short scaling grid through validation.grid + exponent report),
# then a one-screen summary. Each step runs under its own `timeout` (override one with e.g.
# GPU_CHECK_BUDGET_GRID=300) and its output goes to $OUT/logs/<step>.log; a failed step is recorded in
# $OUT/steps.tsv and the next one starts anyway; the exit code is 1 if any step failed.
# Environment: OUT (default ./gpu_out), PACK (default <repo>/gpu_pack), PYTHON (default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=gpu
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --only) ONLY=${2:?--only needs a comma-separated list of steps}; shift ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

for s in ${ONLY//,/ }; do
  case $s in
    setup|pack|pytest|bench|grid) ;;
    *) echo "gpu_check.sh: unknown step $s in --only (steps: setup pack pytest bench grid)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
PACK=${PACK:-$ROOT/gpu_pack}
case $PACK in /*) ;; *) PACK="$PWD/$PACK" ;; esac  # the steps run from the repository root
# scratch that must not travel back with $OUT: unpacked wheels, the dry run's tiny pack
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sfed_gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# the project without installing it (no index there); the unpacked wheels beside it
export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_COMMIT
GPU_CHECK_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
CHECK="$ROOT/bench/gpu_check.py"
cd "$ROOT"

if [ "$MODE" = gpu ]; then
  # Budgets: 470 s of steps + 20 s summary + at most 5 x 5 s of kill-after = 515 s < 9 min; bench and
  # grid stop starting new work well before their budgets run out, so they end with what they measured.
  DEV=cuda; BENCH_MODEL="$PACK/minilm"; BENCH_N="1 8 32 128"; REPEATS=3
  GRID="$ROOT/bench/gpu_check_grid.json"; GRID_MODEL="$PACK/minilm"; N_BOOT=1000
  B_SETUP=30; B_PACK=60; B_PYTEST=50; B_BENCH=90; B_GRID=240
else
  DEV=cpu; BENCH_MODEL=synthetic; BENCH_N="1 2 4"; REPEATS=1
  GRID="$ROOT/bench/gpu_check_grid_dry.json"; GRID_MODEL=""; N_BOOT=200
  # 270 s of steps + 20 s summary: the dry run cannot pass 5 minutes (it takes about 60 s; the grid's refined
  # fit derives its closed forms, with the probe's input bulk, in about 40 s of one core on a quiet machine,
  # twice that on a busy one, or reads them from sfed_theory.form_store)
  B_SETUP=20; B_PACK=30; B_PYTEST=40; B_BENCH=30; B_GRID=150
fi
B_SETUP=${GPU_CHECK_BUDGET_SETUP:-$B_SETUP}; B_PACK=${GPU_CHECK_BUDGET_PACK:-$B_PACK}
B_PYTEST=${GPU_CHECK_BUDGET_PYTEST:-$B_PYTEST}; B_BENCH=${GPU_CHECK_BUDGET_BENCH:-$B_BENCH}
B_GRID=${GPU_CHECK_BUDGET_GRID:-$B_GRID}

: >"$OUT/steps.tsv"
FAILED=0
T0=$(date +%s.%N)

wanted() {  # setup always runs: every other step needs its PYTHONPATH and wheels
  [ "$1" = setup ] || [ -z "$ONLY" ] || case ",$ONLY," in *",$1,"*) true ;; *) false ;; esac
}

step() {  # step NAME BUDGET_S CMD...: run CMD under its own timeout, log it, record the outcome
  local name=$1 budget=$2 rc=0 t s status
  shift 2
  wanted "$name" || return 0
  echo "--- $name (budget ${budget}s)"
  s=$(date +%s.%N)
  timeout --kill-after=5 "$budget" "$@" >"$OUT/logs/$name.log" 2>&1 || rc=$?
  t=$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status=FAILED ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$t" "$budget" >>"$OUT/steps.tsv"
  echo "    $status (rc $rc) in ${t}s; log: $OUT/logs/$name.log"
  if [ "$rc" -ne 0 ]; then
    FAILED=$((FAILED + 1))
    tail -n 8 "$OUT/logs/$name.log" | sed 's/^/    | /'
  fi
}

step setup "$B_SETUP" "$PY" "$CHECK" setup --out "$OUT" --mode "$MODE" --pack "$PACK" --site "$WORK/site"
step pack "$B_PACK" "$PY" "$CHECK" pack --out "$OUT" --mode "$MODE" --model "$PACK/minilm" --work "$WORK/pack"
step pytest "$B_PYTEST" "$PY" "$CHECK" pytest --out "$OUT" --mode "$MODE"
# shellcheck disable=SC2086  # BENCH_N is a list of numbers
step bench "$B_BENCH" "$PY" bench/bench_harness.py --devices "$DEV" --model "$BENCH_MODEL" --n $BENCH_N \
  --repeats "$REPEATS" --csv "$OUT/bench.csv" --budget-s $((B_BENCH / 2))
step grid "$B_GRID" "$PY" "$CHECK" grid --out "$OUT" --config "$GRID" ${GRID_MODEL:+--model "$GRID_MODEL"} \
  --budget-s $((B_GRID * 2 / 3)) --n-boot "$N_BOOT"

TOTAL=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo
if ! timeout 20 "$PY" "$CHECK" summary --out "$OUT" --mode "$MODE" --total-s "$TOTAL" 2>"$OUT/logs/summary.log"; then
  echo "summary failed (log: $OUT/logs/summary.log); steps:"
  cat "$OUT/steps.tsv"
  FAILED=$((FAILED + 1))
fi
[ "$FAILED" -eq 0 ] || exit 1
