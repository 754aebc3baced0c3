set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 150 python3 -m pytest -m gpu tests/test_pallas.py -q -rf -x -k "mosaic_recurrent or smollm" 2>&1 | tee $OUT/tests_full.log | tail -4 | tee $OUT/gpu_tests_quick.txt
timeout 200 python3 .dev/t_s7c4.py 2>&1 | tee $OUT/c4_full.log | grep "^|\|Error\|error" | tee $OUT/c4.txt
timeout 100 python3 -m bench.kernel_profile --pass fwdbwd --out $OUT/profile_fwdbwd.json 2>&1 | grep "^|\|Error\|error" | tee $OUT/profile_fwdbwd.txt
