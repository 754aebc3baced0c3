set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 400 python3 .dev/t_s12c7.py 2>&1 | tee $OUT/segments.log | grep "^|\|Error\|error" | head -40
