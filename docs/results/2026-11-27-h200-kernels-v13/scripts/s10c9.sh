set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/fla .whl/fla*.whl .whl/flash_linear*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/fla
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 420 python3 -m bench.kernels --shapes B1T8192,B1T2048 --fla-bwd --no-xla --out $OUT/table.json 2>&1 | tee $OUT/table.log | grep "^|\|warm-up"
