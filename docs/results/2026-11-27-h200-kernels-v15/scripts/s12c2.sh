set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
MOSAIC_GPU_DUMP_TO=$OUT/dump MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 timeout 150 python3 .dev/t_s12c2.py base 2>&1 | tee $OUT/base.log | grep "^|\|Error\|error\|spill\|registers" | head
timeout 200 python3 .dev/t_s12c2.py no_scores,no_inter,no_scores+no_inter,no_handover,threads=1+no_handover 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error" | head -20
DSLA_APPROX=1 timeout 100 python3 .dev/t_s12c2.py base,no_scores+no_inter 2>&1 | tee $OUT/approx.log | grep "^|\|Error\|error" | head
ls $OUT/dump | head; du -sh $OUT/dump
