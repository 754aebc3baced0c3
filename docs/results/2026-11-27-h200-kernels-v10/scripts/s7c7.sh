set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 235 python3 -m pytest -m gpu tests/test_pallas.py -q -rfxX 2>&1 | tee $OUT/tests_full.log | tail -8 | tee $OUT/gpu_tests.txt
python3 -m pip install -q --no-index --no-deps --target /tmp/fla .whl/fla*.whl .whl/flash_linear*.whl 2>&1 | tail -2
export PYTHONPATH="$PYTHONPATH:/tmp/fla"
timeout 190 python3 -m bench.kernels --shapes B1T8192 --fla-bwd --no-xla --out "$OUT/table_B1T8192_flabwd.json" 2>&1 | tee "$OUT/table_flabwd.log" | grep "^|"
