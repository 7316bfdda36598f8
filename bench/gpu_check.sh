#!/usr/bin/env bash
# The service's GPU figures in one call, without Ray (issue 15) plus issue 14's recorded learning curves.
#
#   OUT=/path bash bench/gpu_check.sh [--tiny] [--budget-s 500] DATA_DIR
#
# DATA_DIR holds fer2013_small/ and ckplus48/ (imagefolder). Steps run in order of value, each under its own
# time limit and within the total budget; a failing or killed step is recorded and the next one runs. Results land
# in $OUT as they come: results.json (every figure), curves_fer2013_small.parquet, curves_ckplus48.parquet and
# log.txt (everything printed). The summary table is printed last.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the results folder}"
TINY="" BUDGET="" SCALE="" DATA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=--tiny ;;
    --budget-s) BUDGET=$2; shift ;;
    --scale) SCALE=$2; shift ;;  # multiplies every step's time limit (a loaded CPU box imports torch in a minute)
    -*) echo "gpu_check.sh: unknown option $1; use --tiny, --budget-s N or --scale N" >&2; exit 2 ;;
    *) DATA=$1 ;;
  esac
  shift
done
if [ -z "$DATA" ] || [ ! -d "$DATA" ]; then
  echo "gpu_check.sh: data folder '${DATA}' not found; pass the folder holding fer2013_small/ and ckplus48/" >&2
  exit 2
fi
if [ -n "$TINY" ]; then SCALE=${SCALE:-10}; BUDGET=${BUDGET:-5000}; else SCALE=${SCALE:-1}; BUDGET=${BUDGET:-500}; fi
mkdir -p "$OUT"
LOG=$OUT/log.txt
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, budget left - RESERVE), log it, record rc and wall time
RESERVE=15  # kept back for the summary
step() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local avail=$(( $(left) - RESERVE ))
  [ "$avail" -lt "$limit" ] && limit=$avail
  if [ "$limit" -lt 5 ]; then
    echo "=== $name: skipped, budget spent" | tee -a "$LOG"
    python3 -m bench.common mark --out "$OUT" --step "$name" --rc 125 --wall-s 0
    return
  fi
  echo "=== $name (limit ${limit}s, $(left)s of the budget left)" | tee -a "$LOG"
  local t0 rc tail
  t0=$(date +%s)
  tail=$(mktemp)
  LIMIT=$limit timeout -k 10 "$limit" "$@" > >(tee -a "$LOG" "$tail") 2>&1
  rc=$?
  sleep 0.2  # let tee finish
  echo "=== $name: rc $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  if [ "$name" = cuda_tests ]; then
    python3 -m bench.common mark --out "$OUT" --step "$name" --rc $rc --wall-s $(( $(date +%s) - t0 )) --tail-file "$tail"
  else
    python3 -m bench.common mark --out "$OUT" --step "$name" --rc $rc --wall-s $(( $(date +%s) - t0 ))
  fi
  rm -f "$tail"
}

if [ -n "$TINY" ]; then CURVES="--configs 2 --epochs 2 --workers 2 --models small_cnn --train-limit 64"; else CURVES="--configs 64 --epochs 30 --workers 8"; fi

{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; } >> "$LOG" 2>&1
step env 30 python3 -m bench.gpu env --out "$OUT" $TINY
step pipeline 75 python3 -m bench.gpu pipeline --out "$OUT" $TINY
step loop 90 python3 -m bench.gpu loop --out "$OUT" $TINY
step packing 120 python3 -m bench.gpu packing --out "$OUT" $TINY --limit-s $(( 110 * SCALE ))
step cuda_tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_data.py tests/test_loop.py -k cuda
step ddp 45 python3 -m bench.gpu ddp --out "$OUT" $TINY --limit-s $(( 40 * SCALE ))
# the curves take what is left (their own limit stops them 10 s early and keeps every finished config)
CURVES_S=$(( ($(left) - RESERVE - 40 * SCALE) / SCALE ))
[ $CURVES_S -gt 330 ] && CURVES_S=330
step curves $CURVES_S python3 -m bench.hpo.curves --data-dir "$DATA" --out "$OUT" $CURVES --limit-s $(( (CURVES_S - 10) * SCALE ))
python3 -m bench.gpu summary --out "$OUT" $TINY | tee -a "$LOG"
