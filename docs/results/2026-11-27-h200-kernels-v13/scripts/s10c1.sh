set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 200 python3 -m pytest -m gpu tests/test_pallas.py -k "dqk_kernels" -q -rf 2>&1 | tee $OUT/tests.log | tail -4
timeout 200 python3 .dev/t_s10c1.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error"
timeout 70 python3 -m bench.kernel_profile --pass fwdbwd --config bwd_intra_fused=True --out $OUT/profile_fwdbwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwdbwd.txt | head -12
timeout 80 ncu --clock-control none -k regex:dqk_mgpu --launch-count 1 --section LaunchStats --section Occupancy --metrics l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum python3 -m bench.kernel_profile --pass fwdbwd --steps 1 --config bwd_intra_fused=True --out /tmp/x.json > $OUT/ncu.txt 2>&1
grep -E "dqk_mgpu|Duration|duration|Registers Per|local_op|dram__bytes|Dynamic Shared|Achieved Occ" $OUT/ncu.txt | head -24
