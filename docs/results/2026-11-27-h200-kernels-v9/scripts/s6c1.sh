set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
python3 -c "import jax; print(jax.__version__)"
timeout 200 python3 -m pytest -m gpu tests/test_pallas.py -q -rf -k "decode" 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
timeout 330 python3 .dev/t_s6c1.py 2>&1 | grep -v "^   {" | tail -40 | tee $OUT/c1.txt
