set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 230 python3 .dev/t_s11c1.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error"
timeout 50 python3 -m bench.kernel_profile --pass fwd --out $OUT/profile_fwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwd.txt | head -8
timeout 130 python3 -m pytest -m gpu tests/test_intra_mgpu.py tests/test_pallas.py -k "intra or mosaic_recurrent or smollm or dqk_kernels" -q -rf 2>&1 | tee $OUT/tests.log | tail -4
