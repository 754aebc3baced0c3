set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pytest_xdist*.whl .whl/execnet*.whl && export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 110 python3 .dev/t_s14c5.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|rel:" | head -20
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 80 python3 -m pytest -q -m gpu -n 2 -rf tests/test_seq_pair_mgpu.py 2>&1 | tail -4 | tee $OUT/gpu_tests.log
