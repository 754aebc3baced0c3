set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 540 python3 -m bench.kernels --no-fla --out $OUT/table.json 2>&1 | tee $OUT/table.log | grep "^|" | tail -40
