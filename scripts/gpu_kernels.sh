#!/usr/bin/env bash
# The kernel issue's measurements on one GPU, in two device calls of under 10 minutes each (`PART=1`, then `PART=2`
# issued at once so the machine stays warm): GPU correctness tests, a quick variant sweep, then the benchmark table
# at the five shapes with flash-linear-attention beside the project's kernels, and FLA's forward+backward (its
# backward kernels autotune for minutes on first use, so it runs last, in its own process).
#
# Runs on the GPU machine's own Python / JAX (no venv). FLA is optional: carry its wheels in .whl/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0
# Results go to $OUT (when set): card.txt, gpu_tests.txt, sweep.json, table_<shapes>.json and the printed tables.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-out/gpu_kernels}
PART=${PART:-1}
mkdir -p "$OUT"
if compgen -G ".whl/fla*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fla .whl/fla*.whl .whl/flash_linear*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/fla"
fi
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
table() {  # table <shapes> <timeout> [extra args]
  local shapes=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m bench.kernels --shapes "$shapes" --out "$OUT/table_${shapes//,/_}.json" "$@" 2>&1 \
    | tee "$OUT/table_${shapes//,/_}.log" | grep "^|"
}
if [ "$PART" = 1 ]; then
  timeout 170 python3 -m pytest -m gpu tests/test_pallas.py -q -rf 2>&1 | tail -12 | tee "$OUT/gpu_tests.txt"
  timeout 170 python3 -m bench.kernels --sweep --quick --sweep-budget 120 --out "$OUT/sweep.json" 2>&1 \
    | tee "$OUT/sweep.log" | grep "^|"
  table B1T8192,B1T32768 230
else
  table B4T8192,B1T2048,B8T2048 300
  table B1T8192 240 --fla-bwd --no-xla
fi
