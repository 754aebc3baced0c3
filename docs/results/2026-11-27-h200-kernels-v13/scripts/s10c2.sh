set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 200 python3 .dev/t_s10c2.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error"
for v in v2 v3; do
timeout 80 ncu --clock-control none -k regex:dqk_mgpu --launch-count 1 --section LaunchStats --metrics l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum,dram__bytes_read.sum,gpu__time_duration.sum python3 .dev/prof_form.py $v > $OUT/ncu_$v.txt 2>&1
grep -E "Duration|duration|Registers Per|local_op|dram__bytes|Dynamic Shared" $OUT/ncu_$v.txt | head -8
done
