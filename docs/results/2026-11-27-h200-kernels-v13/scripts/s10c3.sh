set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
for form in fused separate; do
mkdir -p $OUT/dump_$form
MOSAIC_GPU_DUMP_TO=$OUT/dump_$form MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_PTX=1 timeout 120 python3 .dev/dump_dqk.py $form 2>&1 | tail -3
ls -la $OUT/dump_$form | head; du -sh $OUT/dump_$form
done
grep -rh "spill\|Used" $OUT/dump_*/*ptxas* 2>/dev/null | head
timeout 150 python3 .dev/t_s10c3.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error"
