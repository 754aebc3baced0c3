set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 200 python3 -m pytest -m gpu tests/test_pallas.py -q -rf 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
timeout 300 python3 .dev/t_s6c12.py 2>&1 | grep "^|\|Error" | tee $OUT/c12.txt
