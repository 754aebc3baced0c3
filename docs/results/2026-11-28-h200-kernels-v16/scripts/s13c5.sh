set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 240 python3 -m pytest -q -m gpu tests/test_rec_pair_mgpu.py tests/test_intra_mgpu.py "tests/test_pallas.py::test_gpu_compiled_mosaic_recurrent" 2>&1 | tail -6 | tee $OUT/gpu_tests.log
timeout 240 python3 .dev/t_s13c5.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error" | head -30
timeout 50 python3 -m bench.kernel_profile --pass fwd --shape B1T8192 --config rec_pair=true --out $OUT/profile_fwd_pair.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwd_pair.txt | head -8
timeout 50 python3 -m bench.kernel_profile --pass fwdbwd --shape B1T8192 --config rec_pair=true --out $OUT/profile_fwdbwd_pair.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwdbwd_pair.txt | head -12
