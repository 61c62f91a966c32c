#!/usr/bin/env bash
# The full preset's recipe grid (issue I): head tuning (2) and adapter tuning (3) on hi az et with ALL their training
# sentences, one seed, the epoch chosen on the first 2000 dev sentences, adapter+head on cached body outputs; learning
# rate x epochs. Choice: the cheapest within 0.5 of the best average dev F1, as for results/grid-e5.
#   bash results/grid-full/grid.sh [DATA_DIR]      then: python evaluate.py --sweep results/grid-full
# PREC=--bf16 runs the body passes in bf16 autocast (the full preset's precision).
# M=bert-base-multilingual-cased O=runs/grid-mbert bash results/grid-full/grid.sh hub: the same grid on mBERT, hub data.
set -euo pipefail
M=${M:-multilingual-e5-small} D=${1:-../shared/wikiann} O=${O:-results/grid-full} PREC=${PREC:-}
DATA=(--data-dir "$D"); [ "$D" != hub ] || DATA=()
S=(--dev-size 2000 --lang hi az et --seed 1 --cache-body --min-steps 1000 --feature-cache runs/features-full $PREC)
for s in 2 3; do for lr in 1e-3 3e-3 1e-2 3e-2; do for ep in 5 10 20; do
  python finetune.py --setting $s --model $M "${DATA[@]}" "${S[@]}" --lr $lr --epochs $ep --out $O/s$s-lr$lr-ep$ep
done; done; done
for c in "2 1e-1 10" "3 3e-3 40" "3 1e-3 40" "3 3e-3 80"; do set -- $c  # extensions: the best configurations sat at the grid's edge
  python finetune.py --setting $1 --model $M "${DATA[@]}" "${S[@]}" --lr $2 --epochs $3 --out $O/s$1-lr$2-ep$3
done
python evaluate.py --sweep $O
