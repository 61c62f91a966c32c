#!/usr/bin/env bash
# The fine-tuning grid behind the mini preset's lr/epochs on multilingual-e5-small (run from the repo root).
# Protocol as results/grid (MiniLM): one fine-tuning seed, targets hi az et, the mini preset's target sizes
# (1000/500/1000), dev F1 only; the chosen recipe per group is the cheapest configuration within 0.5 of the
# best average dev F1. Each configuration in its own directory; `python evaluate.py --sweep results/grid-e5`
# then writes results/grid-e5/sweep.md. Full fine-tuning is limited to 4 epochs by the mini preset's budget
# (90 minutes for the whole Table 1 grid on 2 CPU cores). Head and adapter configurations share the
# pretrained body's outputs through --feature-cache (computed once per language).
set -euo pipefail
M=multilingual-e5-small D=${1:-../shared/wikiann} O=${O:-results/grid-e5}
S=(--train-size 1000 --dev-size 500 --test-size 1000 --lang hi az et --seed 1 --word-position first)  # the mini preset's rule
for lr in 1e-4 3e-4 1e-3; do for ep in 2 4; do   # 1: full fine-tuning
  python finetune.py --setting 1 --model $M --data-dir $D "${S[@]}" --lr $lr --epochs $ep --out $O/s1-lr$lr-ep$ep
done; done
for s in 2 3; do for lr in 1e-3 3e-3 1e-2 3e-2; do for ep in 10 20 40; do   # 2: head tuning, 3: adapter tuning
  python finetune.py --setting $s --model $M --data-dir $D "${S[@]}" --lr $lr --epochs $ep --cache-body \
    --feature-cache runs/features --out $O/s$s-lr$lr-ep$ep
done; done; done
for c in "2 3e-2 80" "3 3e-3 80" "3 1e-2 80"; do set -- $c   # extensions: the best head/adapter configurations sat at the edge
  python finetune.py --setting $1 --model $M --data-dir $D "${S[@]}" --lr $2 --epochs $3 --cache-body \
    --feature-cache runs/features --out $O/s$1-lr$2-ep$3
done
python finetune.py --setting 1 --model $M --data-dir $D "${S[@]}" --lr 3e-4 --epochs 6 --out $O/s1-lr3e-4-ep6   # beyond the budget
python evaluate.py --sweep $O
