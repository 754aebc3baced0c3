set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 250 python3 -m pytest -m gpu tests/test_intra_mgpu.py tests/test_fused_mgpu.py -q -rf 2>&1 | tee $OUT/gpu_tests.log | tail -3
