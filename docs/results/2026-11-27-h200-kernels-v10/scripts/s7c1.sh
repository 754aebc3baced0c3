set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 240 python3 -m pytest -m gpu tests/test_pallas.py -q -rf 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
timeout 300 python3 .dev/t_s7c1.py 2>&1 | grep "^|\|Error\|error" | tee $OUT/c1.txt
