set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 150 python3 -m pytest -m gpu tests/test_pallas.py -q -rf -x -k "mosaic_recurrent or smollm" 2>&1 | tee $OUT/tests_full.log | tail -4 | tee $OUT/gpu_tests_quick.txt
timeout 200 python3 .dev/t_s7c6.py 2>&1 | tee $OUT/c6_full.log | grep "^|\|Error\|error" | tee $OUT/c6.txt
timeout 100 python3 -m bench.kernel_profile --pass fwdbwd --out $OUT/profile_fwdbwd.json 2>&1 | grep "^|\|Error\|error" | tee $OUT/profile_fwdbwd.txt
timeout 120 ncu --clock-control none -k regex:dqk_mgpu --launch-count 1 --section LaunchStats --section Occupancy --metrics l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum,dram__bytes_read.sum,dram__bytes_write.sum python3 -m bench.kernel_profile --pass fwdbwd --steps 1 --out /tmp/x.json > $OUT/ncu.txt 2>&1
grep -E "dqk_mgpu|Duration|Registers Per|local_op|dram__bytes|Dynamic Shared|Block Limit Shared|Achieved Occ" $OUT/ncu.txt | head -20
