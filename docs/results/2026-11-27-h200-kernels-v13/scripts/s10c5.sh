set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 540 python3 -m pytest -m gpu tests/test_pallas.py tests/test_intra_mgpu.py -v -rfxX 2>&1 | grep -E "PASS|FAIL|XPASS|XFAIL|ERROR|passed|failed" | tee $OUT/gpu_tests.txt | tail -34
