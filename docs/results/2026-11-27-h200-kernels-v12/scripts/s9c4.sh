set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/fla .whl/fla*.whl .whl/flash_linear*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/fla
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 400 python3 -m pytest -m gpu tests/test_pallas.py tests/test_intra_mgpu.py -v -rfxX 2>&1 | grep -E "PASS|FAIL|XPASS|XFAIL|ERROR|passed|failed" | tee $OUT/gpu_tests.txt | tail -30
timeout 175 python3 -m bench.kernels --shapes B1T8192 --out $OUT/table_B1T8192.json 2>&1 | tee $OUT/table_B1T8192.log | grep "^|"
