set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pytest_xdist*.whl .whl/execnet*.whl && export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 170 python3 .dev/t_s14c4.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|rel:" | head -30
timeout 45 python3 -m bench.kernel_profile --pass fwd --shape B1T8192 --out $OUT/profile_fwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwd.txt | head -6
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 python3 -m pytest -q -m gpu -n 2 -rf tests/test_rec_pair_mgpu.py 2>&1 | tail -4 | tee $OUT/gpu_tests.log
