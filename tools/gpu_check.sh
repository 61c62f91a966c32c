#!/usr/bin/env bash
# The GPU check: run this first on a machine with a CUDA GPU (issue L). In under 10 minutes on one data-centre GPU it
# runs what our CPU machines cannot: the smoke grid on CUDA (every script's GPU path, the used-vocabulary-rows lever,
# settings 1-7), the priming/fine-tuning benchmark on CUDA in fp32 and bf16, a short slice of the paper preset (real
# WikiAnn, a few hundred meta-steps, the adapter's recipe chosen on hi's dev F1 by a small --recipe auto grid,
# settings 3 and 4 on hi with it; then setting 3 with --bf16), and torchrun with
# NCCL when there are 2+ GPUs. It prints one summary line per check ("gpu_check: NAME: ok|FAILED|skipped ...") and
# exits 1 if a check failed. Without a GPU every check says "skipped" in one line (the test suite runs it that way).
#
#   bash tools/gpu_check.sh                                   # ../shared/wikiann (or shared/wikiann), multilingual-e5-small
#   bash tools/gpu_check.sh --data-dir D --model M --out DIR  # M: any BERT-like model, e.g. bert-base-multilingual-cased
#   bash tools/gpu_check.sh --random-weights DIR              # no model weights there: DIR holds a config.json and a
#                                                             # tokenizer (e.g. e5's); random weights of that shape are drawn
# Logs and runs: OUT/<device>/<check>.log and OUT/<device>/<check>/ (OUT defaults to runs/gpu_check; <device> is the GPU's
# name, e.g. nvidia-h100-80gb-hbm3, or cpu): finetune.py's run identity leaves the device out, so a rerun on another device
# must not find the runs made here. The slice's F1 is only a sanity check with --random-weights.
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
DATA_DIR= MODEL=multilingual-e5-small OUT=runs/gpu_check RANDOM_FROM= DEVICE=cuda
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "gpu_check.sh: $1 needs a value" >&2; exit 2; }
  case "$1" in
    --data-dir) DATA_DIR=$2 ;;  --model) MODEL=$2 ;;  --out) OUT=$2 ;;  --random-weights) RANDOM_FROM=$2 ;;
    --device) DEVICE=$2 ;;  # cpu: the same checks on the CPU (slow; to try the script itself)
    *) echo "gpu_check.sh: unknown option $1 (see the top of tools/gpu_check.sh)" >&2; exit 2 ;;
  esac
  shift 2
done
for d in "$DATA_DIR" "$HERE/../shared/wikiann" "$HERE/shared/wikiann"; do
  [ -n "$d" ] && [ -d "$d/hi" ] && { DATA_DIR=$d; break; }
done
FAILED=0
say() { echo "gpu_check: $*"; }
took() { echo "$(( $(date +%s) - $1 )) s"; }
check() {  # check NAME COMMAND...: run it, log to OUT/NAME.log, one line
  local name=$1 start; start=$(date +%s); shift
  local rc=0
  "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then say "$name: ok in $(took "$start"); $(summary "$name")"
  else FAILED=1; say "$name: FAILED (exit $rc) after $(took "$start"): $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-200)"; fi
}
summary() {  # the check's own numbers, from its outputs
  case $1 in
    smoke) echo "$(ls "$OUT"/smoke/finetune/s*/*/seed1/result.json 2>/dev/null | wc -l) runs; devices: $(python - "$OUT/smoke" <<'EOF'
import glob, json, sys
print(" ".join(sorted({json.load(open(p))["config"]["device"] for p in glob.glob(sys.argv[1] + "/finetune/**/result.json", recursive=True)})))
EOF
)" ;;
    bench*) grep '^summary: ' "$OUT/$1.log" | cut -c10-300 ;;
    slice*) python - "$OUT/$1" <<'EOF'
import glob, json, sys
for p in sorted(glob.glob(sys.argv[1] + "/**/result.json", recursive=True)):
    r = json.load(open(p))
    if r.get("test_f1") is not None:  # the recipe grid's runs are dev-only
        print(f"s{r['setting']} {r['lang']}: test F1 {r['test_f1']:.2f} in {r['wall_time_s']:.0f} s;", end=" ")
for p in glob.glob(sys.argv[1] + "/recipes.json"):
    g = json.load(open(p))["groups"]["adapter"]
    print(f"recipe lr {g['chosen']['lr']:g} x {g['chosen']['epochs']} ({len(g['cells'])} cells, {g['wall_time_s']:.0f} s);", end=" ")
for p in glob.glob(sys.argv[1] + "/prime/config.json"):
    c = json.load(open(p))
    print(f"priming {c['steps']} meta-steps in {c.get('wall_time_s', 0):.0f} s")
EOF
;;
    torchrun) grep -o 'primed checkpoint: .*' "$OUT/torchrun.log" | tail -n 1 ;;
  esac
}

GPUS=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$GPUS" -eq 0 ] && [ "$DEVICE" = cuda ]; then
  for name in device smoke bench-fp32 bench-bf16 slice slice-bf16 torchrun; do say "$name: skipped (no CUDA GPU here)"; done
  exit 0
fi
TAG=cpu
[ "$DEVICE" = cpu ] || TAG=$(python -c "import sys, torch; print(torch.cuda.get_device_name(sys.argv[1]))" "$DEVICE" 2>/dev/null |
  tr 'A-Z' 'a-z' | sed 's/[^a-z0-9.]\{1,\}/-/g')
[ -n "$TAG" ] || { echo "gpu_check.sh: cannot name the device $DEVICE" >&2; exit 2; }
OUT=$OUT/$TAG
mkdir -p "$OUT"
[ "$DEVICE" != cuda ] || say "device: $(python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}')"); outputs in $OUT"

if [ -n "$RANDOM_FROM" ]; then  # a model of that shape with random weights (no weights could travel here)
  MODEL=$OUT/random-model
  [ -f "$MODEL/model.safetensors" ] || python - "$RANDOM_FROM" "$MODEL" <<'EOF' || { say "random weights: FAILED"; exit 1; }
import shutil, sys, torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
torch.manual_seed(0)
AutoModel.from_config(AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
EOF
fi

check smoke env $([ "$DEVICE" = cuda ] || echo CUDA_VISIBLE_DEVICES=) bash "$HERE/run_table1.sh" --preset smoke --out "$OUT/smoke"
BENCH=(--model "$MODEL" --device "$DEVICE" --parts 1,2,4 --repeats 3 --ft-lang hi)
[ -n "$DATA_DIR" ] && BENCH+=(--data-dir "$DATA_DIR") || BENCH+=(--synthetic)
check bench-fp32 python "$HERE/bench.py" "${BENCH[@]}"
check bench-bf16 python "$HERE/bench.py" "${BENCH[@]}" --bf16
if [ -z "$DATA_DIR" ]; then
  say "slice: skipped (no WikiAnn: --data-dir D, or shared/wikiann in the checkout)"
else
  SLICE=(--data-dir "$DATA_DIR" --device "$DEVICE")
  slice() {  # the paper preset's path, cut to 300 meta-steps, one target and a small recipe grid; $1: OUT/slice dir
    local dir=$1; shift
    local ft=(--cache-body --min-steps 1000 --feature-cache "$dir/features")  # as run_table1.sh --preset paper
    python "$HERE/prime.py" --model "$MODEL" "${SLICE[@]}" --max-steps 300 --out "$dir/prime" "$@" &&
    python "$HERE/recipe.py" --group adapter --out "$dir" --targets hi --epochs 5,10 --max-extensions 1 \
      --finetune-flags "$(printf '%q ' --model "$MODEL" "${SLICE[@]}" "${ft[@]}" "$@")" &&
    python "$HERE/finetune.py" --setting 3 --model "$MODEL" "${SLICE[@]}" --lang hi --seed 1 --out "$dir/s3" \
      --recipe "$dir/recipes.json" "${ft[@]}" "$@" &&
    python "$HERE/finetune.py" --setting 4 --init "$dir/prime" "${SLICE[@]}" --lang hi --seed 1 --out "$dir/s4" \
      --recipe "$dir/recipes.json" "${ft[@]}" "$@"
  }
  check slice slice "$OUT/slice"
  check slice-bf16 python "$HERE/finetune.py" --setting 3 --model "$MODEL" "${SLICE[@]}" --lang hi --seed 1 --epochs 2 \
    --bf16 --out "$OUT/slice-bf16/s3"
fi
if [ "$DEVICE" != cuda ]; then
  say "torchrun: skipped (NCCL: --device cuda only)"
elif [ "$GPUS" -ge 2 ]; then
  check torchrun python -m torch.distributed.run --standalone --nproc_per_node 2 "$HERE/prime.py" --model "$OUT/smoke/tiny-bert" \
    --synthetic --train-size 96 --support-size 8 --query-size 8 --max-steps 6 --device cuda --out "$OUT/torchrun"
else
  say "torchrun: skipped (NCCL needs 2 GPUs, this machine has $GPUS)"
fi
exit $FAILED
