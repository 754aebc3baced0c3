set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
timeout 540 python3 -m bench.kernels --shapes B1T8192,B1T32768 --fla-bwd --no-xla --out $OUT/table.json 2>&1 | tee $OUT/table.log | grep "^|" | tail -30
