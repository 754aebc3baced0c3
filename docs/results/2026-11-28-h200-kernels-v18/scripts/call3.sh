set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pytest_xdist*.whl .whl/execnet*.whl && export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 150 python3 .dev/t_s15c3.py 2>&1 | tee $OUT/ablate.log | grep "^|\|Error" | head -30
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 360 python3 -m pytest -q -m gpu -n 4 -rf tests/ 2>&1 | tail -15 | tee $OUT/gpu_tests.log
