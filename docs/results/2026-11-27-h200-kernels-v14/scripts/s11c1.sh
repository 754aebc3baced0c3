set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 200 python3 .dev/t_s11c1.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error"
timeout 60 python3 -m bench.kernel_profile --pass fwd --out $OUT/profile_fwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwd.txt | head -16
timeout 320 python3 -m pytest -m gpu tests/test_pallas.py tests/test_intra_mgpu.py -q -rf 2>&1 | tee $OUT/tests.log | tail -4
