#!/usr/bin/env bash
# The kernel issue's measurements on one GPU, in device calls of under 10 minutes each (`PART=1` .. `PART=4`, issued
# back to back so the machine stays warm):
#   1: every GPU correctness test (~4-5 minutes) and the per-kernel profile of the forward and forward + backward
#      (`bench.kernel_profile`);
#   2: the benchmark table at the five shapes with flash-linear-attention beside the project's kernels (the two long
#      shapes with PART=4's sweep pick where SWEEP or $OUT/sweep.json is at hand);
#   3: FLA's forward+backward (its backward kernels autotune for minutes on first use, so it runs in its own call);
#   4: a quick variant sweep of the Pallas kernels.
#
# Runs on the GPU machine's own Python / JAX (no venv). FLA is optional: carry its wheels in .whl/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0
# Results go to $OUT (when set): card.txt, gpu_tests.txt, profile_*.json, sweep.json, table_<shapes>.json and the
# printed tables.
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
  timeout 400 python3 -m pytest -m gpu tests/test_pallas.py -q -rfxX 2>&1 | tail -12 | tee "$OUT/gpu_tests.txt"
  for pass in fwd fwdbwd; do
    timeout 80 python3 -m bench.kernel_profile --pass "$pass" --out "$OUT/profile_$pass.json" 2>&1 \
      | tee "$OUT/profile_$pass.log" | grep "^|"
  done
elif [ "$PART" = 4 ]; then
  timeout 330 python3 -m bench.kernels --sweep --quick --sweep-budget 280 --out "$OUT/sweep.json" 2>&1 \
    | tee "$OUT/sweep.log" | grep "^|"
elif [ "$PART" = 2 ]; then
  # The sweep's pick where PART=1's sweep.json is at hand (SWEEP=path; each device call starts with an empty $OUT).
  SWEEP=${SWEEP:-$OUT/sweep.json}
  if [ -f "$SWEEP" ]; then pick=(--config-from "$SWEEP"); else pick=(); fi
  table B1T8192,B1T32768 300 ${pick[@]+"${pick[@]}"}
  table B4T8192,B1T2048,B8T2048 240
else
  table B1T8192 300 --fla-bwd --no-xla
fi
