export PYTHONPATH=. PYTHONUNBUFFERED=1; nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt; timeout 200 python3 .dev/t_s9c8.py 2>&1 | tee $OUT/ab.log | grep "^|\|Error\|error"
