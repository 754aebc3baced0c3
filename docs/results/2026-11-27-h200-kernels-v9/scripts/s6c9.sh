set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 300 python3 -m pytest -m gpu tests/ -q -rf 2>&1 | tail -12 | tee $OUT/gpu_tests.txt
