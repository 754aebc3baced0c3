set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pytest_xdist*.whl .whl/execnet*.whl && export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 420 python3 -m pytest -q -m gpu -n 4 -rf tests/test_seq_pair_mgpu.py tests/test_rec_pair_mgpu.py tests/test_pallas.py tests/test_intra_mgpu.py tests/test_fused_mgpu.py 2>&1 | tail -15 | tee $OUT/gpu_tests.log
