set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
K1="mosaic_recurrent or smollm or triton_dqk"
timeout 140 python3 -m pytest -m gpu tests/test_pallas.py -q -rf -k "$K1" 2>&1 | tee $OUT/tests_quick.log | tail -6
timeout 130 python3 .dev/t_s8c2.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error"
timeout 70 python3 -m bench.kernel_profile --pass fwdbwd --out $OUT/profile_fwdbwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwdbwd.txt
timeout 80 ncu --clock-control none -k regex:dqk_mgpu --launch-count 1 --section LaunchStats --section Occupancy --metrics l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum,dram__bytes_read.sum,dram__bytes_write.sum python3 -m bench.kernel_profile --pass fwdbwd --steps 1 --out /tmp/x.json > $OUT/ncu.txt 2>&1
grep -E "dqk_mgpu|Duration|Registers Per|local_op|dram__bytes|Dynamic Shared|Block Limit Shared|Achieved Occ" $OUT/ncu.txt | head -20
