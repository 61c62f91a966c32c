#!/usr/bin/env bash
# On a CPU: is one process on every core faster than two processes at once (run_table1.sh --jobs 2), each on half of
# them? Issue P's lever. Times, in fp32 and bf16, (a) one process with all cores, then (b) two of the same processes at
# once with half the cores each: 10 meta-steps of the mini preset's priming (prime.py, Algorithm 1), and one epoch of full
# fine-tuning on 300 hi sentences (finetune.py setting 1). Prints one line per case: the wall time of (a), of (b) (two
# units' work), and the scripts' own wall_time_s (without the ~10 s of imports and model loading).
# Run it on a quiet machine (no other CPU-heavy job), from the repository root:
#
#   bash tools/cpu_jobs.sh                                     # ../shared/wikiann, multilingual-e5-small
#   bash tools/cpu_jobs.sh --data-dir D --model M --out DIR
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
DATA_DIR=$HERE/../shared/wikiann MODEL=multilingual-e5-small OUT=runs/cpu_jobs
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "cpu_jobs.sh: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --data-dir) DATA_DIR=$2 ;;  --model) MODEL=$2 ;;  --out) OUT=$2 ;;
    *) echo "cpu_jobs.sh: unknown option $1 (see the top of tools/cpu_jobs.sh)" >&2; exit 2 ;;
  esac
  shift 2
done
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
HALF=$((CORES / 2))
[ "$HALF" -ge 1 ] || { echo "cpu_jobs.sh: one core only; nothing to compare" >&2; exit 2; }
rm -rf "$OUT"; mkdir -p "$OUT"
PRIME=(python "$HERE/prime.py" --model "$MODEL" --data-dir "$DATA_DIR" --sources en es --train-size 4000 --epochs 1 --max-steps 10)
FULL=(python "$HERE/finetune.py" --setting 1 --model "$MODEL" --data-dir "$DATA_DIR" --lang hi --train-size 300 --dev-size 100
      --test-size 100 --epochs 1 --lr 3e-4)
now() { date +%s.%N; }
since() { python -c "print(f'{$(now) - $1:.1f}')"; }
inner() {  # the scripts' own wall_time_s of the runs under OUT/NAME-*
  python -c "import glob, json, sys; print(', '.join(str(json.load(open(f))['wall_time_s']) for f in sorted(glob.glob(sys.argv[1] + '-*/config.json') + glob.glob(sys.argv[1] + '-*/hi/seed1/result.json'))))" "$1"
}
for prec in fp32 bf16; do
  flag=(); [ $prec = fp32 ] || flag=(--bf16)
  for stage in priming full-ft; do
    if [ $stage = priming ]; then cmd=("${PRIME[@]}"); else cmd=("${FULL[@]}"); fi
    name=$OUT/$stage-$prec
    t=$(now); OMP_NUM_THREADS=$CORES MKL_NUM_THREADS=$CORES "${cmd[@]}" "${flag[@]}" --out "$name-a" > "$name-a.log" 2>&1 || { echo "cpu_jobs.sh: failed, see $name-a.log" >&2; exit 1; }
    one=$(since "$t")
    t=$(now)
    OMP_NUM_THREADS=$HALF MKL_NUM_THREADS=$HALF "${cmd[@]}" "${flag[@]}" --out "$name-b1" > "$name-b1.log" 2>&1 &
    OMP_NUM_THREADS=$HALF MKL_NUM_THREADS=$HALF "${cmd[@]}" "${flag[@]}" --out "$name-b2" > "$name-b2.log" 2>&1 &
    wait
    two=$(since "$t")
    echo "cpu_jobs: $stage $prec: one $CORES-thread process ${one} s; two $HALF-thread processes at once ${two} s" \
         "(twice the work: $(python -c "print(f'{2 * $one / $two:.2f}')")x the throughput); inside the scripts (a, b1, b2): $(inner "$name")"
  done
done
