set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/fla .whl/fla*.whl .whl/flash_linear*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/fla
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 290 python3 -m bench.kernels --shapes B1T8192 --fla-bwd --no-xla --out $OUT/table_B1T8192_flabwd.json 2>&1 | tee $OUT/table_flabwd.log | grep "^|"
timeout 285 python3 -m pytest -m gpu tests/test_pallas.py -v -rfxX 2>&1 | grep -E "PASS|FAIL|XPASS|XFAIL|ERROR|passed|failed" | tee $OUT/gpu_tests.txt | tail -25
