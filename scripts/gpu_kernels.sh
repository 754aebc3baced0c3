#!/usr/bin/env bash
# The kernel issue's measurements in one device call (about 8 minutes): GPU correctness tests, then the benchmark
# table with flash-linear-attention beside the project's kernels, the most important shapes first.
#
# Runs on the GPU machine's own Python / JAX (no venv). FLA is optional: carry its wheels in .whl/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0
# Results go to $OUT (when set): gpu_tests.txt, table_<shapes>.json and the printed tables.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu_kernels}
mkdir -p "$OUT"
if compgen -G ".whl/fla*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fla .whl/fla*.whl .whl/flash_linear*.whl
  export PYTHONPATH="/tmp/fla${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
timeout 180 python3 -m pytest -m gpu tests/test_pallas.py -q -rf 2>&1 | tail -20 | tee "$OUT/gpu_tests.txt"
for shapes in B1T8192,B1T32768 B4T8192,B1T2048,B8T2048; do
  timeout 200 python3 -m bench.kernels --shapes "$shapes" --out "$OUT/table_${shapes//,/_}.json" 2>&1 \
    | grep "^|" | tee "$OUT/table_${shapes//,/_}.txt"
done
