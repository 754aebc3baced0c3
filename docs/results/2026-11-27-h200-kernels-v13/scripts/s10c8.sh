set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 150 python3 .dev/t_s10c8.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error"
timeout 60 python3 -m bench.kernel_profile --pass fwdbwd --out $OUT/profile_fwdbwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwdbwd.txt | head -16
timeout 200 python3 -m pytest -m gpu tests/test_pallas.py -k "dqk_kernels or smollm" -q -rf 2>&1 | tee $OUT/tests.log | tail -3
