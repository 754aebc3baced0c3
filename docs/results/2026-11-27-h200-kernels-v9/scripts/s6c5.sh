set -uo pipefail
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 300 python3 .dev/t_s6c5.py 2>&1 | grep "^|\|Error" | tee $OUT/c5.txt
