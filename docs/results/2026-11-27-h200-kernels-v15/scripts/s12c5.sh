set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 120 python3 -m bench.kernel_profile --pass fwdbwd --shape B1T8192 --out $OUT/profile_fwdbwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwdbwd.txt | head -30
timeout 90 python3 -m bench.kernel_profile --pass fwd --shape B1T8192 --out $OUT/profile_fwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwd.txt | head -12
