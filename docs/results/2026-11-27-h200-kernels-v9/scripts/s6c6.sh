set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 150 python3 -m pytest -m gpu tests/test_pallas.py -q -rf -k "mosaic" 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
timeout 400 python3 .dev/t_s6c6.py 2>&1 | grep "^|\|Error" | tee $OUT/c6.txt
