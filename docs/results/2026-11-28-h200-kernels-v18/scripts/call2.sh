set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
git log -1 --format=%H > $OUT/commit.txt 2>/dev/null
timeout 100 python3 -m pytest -q -m gpu -rf tests/test_dqk_pair_mgpu.py 2>&1 | tail -8 | tee $OUT/gpu_tests.log
timeout 250 python3 .dev/t_s15c2.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|rel" | head -30
timeout 60 python3 -m bench.kernel_profile --pass fwdbwd --shape B1T8192 --out $OUT/profile_fwdbwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwdbwd.txt | head -14
