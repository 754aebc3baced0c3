set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
git log -1 --format=%H > $OUT/commit.txt
timeout 330 python3 .dev/t_s12c1.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error" | head -60
timeout 90 python3 -m bench.kernel_profile --pass fwd --shape B1T8192 --out $OUT/profile_fwd.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwd.txt | head -16
timeout 90 python3 -m bench.kernel_profile --pass fwd --shape B1T8192 --config fwd_fused_mosaic=false --out $OUT/profile_fwd_split.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwd_split.txt | head -16
