set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
mkdir -p /tmp/dump
MOSAIC_GPU_DUMP_TO=/tmp/dump MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 python3 .dev/dump_dqk.py fused 2>&1 | tail -1
cp /tmp/dump/*.ptxas /tmp/dump/*.resources.txt $OUT/ 2>/dev/null; cat /tmp/dump/*.ptxas
timeout 150 python3 .dev/t_s10c4.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error"
timeout 80 ncu --clock-control none -k regex:dqk_mgpu --launch-count 1 --section LaunchStats --metrics l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,dram__bytes_read.sum,gpu__time_duration.sum python3 .dev/prof_form.py v2 > $OUT/ncu.txt 2>&1
grep -E "duration|Registers Per|local_op|dram__bytes|Dynamic Shared" $OUT/ncu.txt | head -8
