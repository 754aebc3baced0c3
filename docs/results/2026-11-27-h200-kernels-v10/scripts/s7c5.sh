set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 200 python3 .dev/t_s7c5.py 2>&1 | tee $OUT/c5_full.log | grep "^|\|Error\|error" | tee $OUT/c5.txt
timeout 150 ncu --clock-control none -k regex:dqk_mgpu --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --metrics l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum,dram__bytes_read.sum,dram__bytes_write.sum python3 .dev/t_s7c5.py ncu > $OUT/ncu.txt 2>&1
grep -E "dqk_mgpu|Duration|Registers Per|local_op|dram__bytes|Memory Throughput|Achieved Occupancy|Warp Cycles Per Issued|Shared Memory|Stall|stall|Theoretical Occ|Block Limit" $OUT/ncu.txt | head -60
