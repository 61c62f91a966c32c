#!/usr/bin/env bash
# Issue G: priming variants that simulate adapter tuning more faithfully, and the meta-learners beside them,
# each primed with seeds 1-3 on the mini preset's priming data, then adapter-tuned (setting 4's recipe, with
# --allow-any-priming) on the 6 targets x 3 fine-tuning seeds. Settings 3, 4 and 5 beside them come from
# results/mini and results/mini-prime{2,3}. Run from the repo root; OUT defaults to runs/variants.
#   bash results/variants/run.sh [OUT] [SEEDS]
set -euo pipefail
OUT=${1:-runs/variants} SEEDS=${2:-1 2 3}
D=../shared/wikiann M=multilingual-e5-small
PRIME=(--model $M --data-dir $D --sources en es --train-size 4000 --epochs 1 --save-every 10 --resume --word-position first)
FT=(--model $M --data-dir $D --lang hi af az lt et nl --seed 1 2 3 --train-size 1000 --dev-size 500 --test-size 1000
    --epochs 40 --lr 3e-3 --cache-body --allow-any-priming --word-position first)  # the rule before issue N
declare -A VARIANTS=(
  [fresh-head]="--inner-head fresh"                        # each task's inner loop starts from a new random head
  [adamw]="--inner-optimizer adamw --inner-lr 3e-3"        # AdamW from a zero state, at adapter tuning's lr
  [s50]="--inner-steps 50"                                 # a ten times longer inner loop (cached body output)
  [faithful]="--inner-head fresh --inner-optimizer adamw --inner-lr 3e-3 --inner-steps 50"   # all three
  [second-order]="--meta-grad second"                      # exact MAML through the adapter+head inner loop
  [reptile]="--mode reptile"                               # Reptile, PE analogue (prime.reptile_gradients)
)
for seed in $SEEDS; do
  for name in fresh-head adamw s50 faithful second-order reptile; do
    dir=$OUT/$name-prime$seed
    [ -f "$dir/prime/$name/checkpoint.json" ] || python prime.py "${PRIME[@]}" ${VARIANTS[$name]} --seed $seed --out $dir/prime/$name
    python finetune.py --setting 4 --init $dir/prime/$name "${FT[@]}" --out $dir/finetune/s4
  done
done
