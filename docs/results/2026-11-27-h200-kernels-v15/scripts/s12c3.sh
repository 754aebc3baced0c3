set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 420 python3 .dev/t_s12c3.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error" | head -40
timeout 90 python3 -m bench.kernel_profile --pass fwd --shape B1T8192 --config fwd_fused_mosaic=false --out $OUT/profile_fwd_split_approx.json 2>&1 | grep "^|\|Error" | tee $OUT/profile_fwd_split_approx.txt | head -8
