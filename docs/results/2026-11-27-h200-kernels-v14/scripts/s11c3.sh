set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
git log -1 --format=%h > $OUT/commit.txt 2>/dev/null || true
timeout 470 python3 -m pytest -m gpu tests/test_pallas.py tests/test_intra_mgpu.py -q -rf --durations=5 2>&1 | tee $OUT/gpu_tests.log | tail -12
python3 -m pip install -q --no-index --no-deps --target /tmp/fla .whl/fla*.whl .whl/flash_linear*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/fla
timeout 100 python3 -m bench.kernels --shapes B1T32768 --no-xla --out $OUT/table.json 2>&1 | grep -v Warn | tee $OUT/table.log | grep "^|"
