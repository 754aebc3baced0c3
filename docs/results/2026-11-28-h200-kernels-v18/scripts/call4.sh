set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pytest_xdist*.whl .whl/execnet*.whl && export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 160 python3 .dev/t_s15c4.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|rel" | head -30
timeout 50 python3 -m bench.kernel_profile --pass fwdbwd --shape B1T8192 --out $OUT/profile_fwdbwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwdbwd.txt | head -8
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 260 python3 -m pytest -q -m gpu -n 4 -rf tests/test_pallas.py tests/test_seq_pair_mgpu.py 2>&1 | tail -6 | tee $OUT/gpu_tests.log
