#!/usr/bin/env bash
# Issue F: does priming carry over to LoRA and BitFit? For each method, on the mini preset: PE tuning (setting
# 3's analogue), meta priming -> PE (4) and FT priming -> PE (5), with the method's recipe from results/grid-pe.
#   bash results/pe/run.sh [OUT_PREFIX] [PRIME_SEEDS] [SEEDS]     e.g. bash results/pe/run.sh runs/pe "1 2 3" 1,2,3
# Writes OUT_PREFIX-<method>-prime<k>/ (settings 3-5 for k=1, 4-5 for the other priming seeds). PRECISION=bf16: bf16
# autocast through the body (run_table1.sh --precision).
set -euo pipefail
PREFIX=${1:-runs/pe} PRIME_SEEDS=${2:-1 2 3} SEEDS=${3:-1,2,3}
FIRST=${PRIME_SEEDS%% *}  # setting 3 does not depend on priming: run it with the first priming seed only
for k in $PRIME_SEEDS; do  # both methods with a priming seed before the next seed
  for pe in lora bitfit; do
    settings=4,5; [ "$k" = "$FIRST" ] && settings=3,4,5
    bash run_table1.sh --preset mini --pe $pe --settings $settings --prime-seed $k --seeds $SEEDS ${PRECISION:+--precision $PRECISION} \
      --out $PREFIX-$pe-prime$k
  done
done
