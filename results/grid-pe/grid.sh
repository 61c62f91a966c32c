#!/usr/bin/env bash
# Issue F: the PE-tuning recipe of LoRA and BitFit on the mini preset (multilingual-e5-small), by the protocol of
# results/grid-e5: one fine-tuning seed, targets hi az et, 1000/500/1000 sentences, dev F1 only; the chosen
# recipe is the cheapest configuration within 0.5 of the best average dev F1. LoRA and BitFit live inside the
# body, so no body output can be cached: every epoch is a forward+backward pass through the body, and the
# epochs are few (the adapter's 40 epochs on cached outputs cost less than one of these).
#   bash results/grid-pe/grid.sh [DATA_DIR]; O=runs/grid-pe to write elsewhere; then python evaluate.py --sweep $O
# PREC=--bf16: bf16 autocast through the body (LoRA and BitFit tuning run it forward and backward every step)
# 3e-3 x 8 was added after the first five: both methods were best at 3e-3 x 4, the grid's epoch edge, and unstable at
# 1e-2. 8 epochs is the cap: the table's 54 runs per method x 8 epochs x ~25 s fill most of its 4 CPU-hours.
set -euo pipefail
M=multilingual-e5-small D=${1:-../shared/wikiann} O=${O:-results/grid-pe} PREC=${PREC:-}
S=(--train-size 1000 --dev-size 500 --test-size 1000 --lang hi az et --seed 1 --word-position first $PREC)  # the mini preset's rule
for pe in lora bitfit; do
  for c in "1e-3 2" "1e-3 4" "3e-3 2" "3e-3 4" "1e-2 4" "3e-3 8"; do set -- $c
    python finetune.py --setting 3 --pe $pe --model $M --data-dir $D "${S[@]}" --lr $1 --epochs $2 --out $O/$pe/s3-lr$1-ep$2
  done
done
python evaluate.py --sweep $O/lora && python evaluate.py --sweep $O/bitfit
