#!/usr/bin/env bash
# The real distillation runs of SmolLM2-135M on the lent GPU, resumable across 10-minute calls.
#
# Runs on the GPU machine's own Python 3.12 / JAX / Flax / Optax / Orbax (no venv, no network). It needs:
#   $MODEL       the SmolLM2-135M GGUF (default /tmp/smol.gguf; see ../shared/DEVICE.md for carrying it)
#   $TRAIN       training text, a folder or file (default .data/train: the corpus train/ copied into the repo)
#   $VALID       comma-separated held-out files (default: three files of .data/valid/)
#   the `gguf` package: preinstalled, or a wheel under .whl/ (pip download --no-deps gguf==0.19.0 -d .whl)
# and, as $RUNS, which runs to make, in order: ORDERING:MIXER[:STAGES] items, e.g. the default
#   "entropy:dsla sensitivity:dsla entropy:gla:0.5"
# (25/50/75% of the layers for each ordering, and the single-state GLA ablation at 50% on the entropy order).
#
# $EXTRA adds key=value overrides to every run (e.g. EXTRA="chain.steps_per_layer=60 train.batch_size=8").
# Each call trains until about $TIME_LIMIT seconds (default 480) have passed, checkpointing under $RUN_DIR
# (default /tmp/dsla_runs, which survives while the machine stays warm), then exits 75: call it again at once to
# continue. It exits 0 when every run is done. Results go to $OUT (when set): results.json (every run's summary,
# evaluations and conversion orders, plus the comparison of the two orders), <run>_metrics.jsonl, and log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-/tmp/smol.gguf}
TRAIN=${TRAIN:-.data/train}
VALID=${VALID:-.data/valid/gnu_standards.txt,.data/valid/britannica-11th.txt,.data/valid/hamlet_gut.txt}
RUNS=${RUNS:-"entropy:dsla sensitivity:dsla entropy:gla:0.5"}
RUN_DIR=${RUN_DIR:-/tmp/dsla_runs}
TIME_LIMIT=${TIME_LIMIT:-480}
PYTHON=${PYTHON:-python3}
EXTRA=${EXTRA:-}  # further key=value overrides for every run, e.g. "chain.steps_per_layer=60"
START=$(date +%s)
mkdir -p "$RUN_DIR"
LOG="$RUN_DIR/log.txt"

if ! "$PYTHON" -c "import gguf" 2>/dev/null; then
  if compgen -G ".whl/gguf-*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "error: the gguf package is missing; carry a wheel in .whl/ (pip download --no-deps gguf==0.19.0 -d .whl)" >&2
    exit 1
  fi
fi
for path in "$MODEL" "$TRAIN"; do
  [ -e "$path" ] || { echo "error: $path does not exist (see the header of $0)" >&2; exit 1; }
done

collect() {  # copy the small result files to $OUT
  [ -n "${OUT:-}" ] || return 0
  "$PYTHON" - "$RUN_DIR" "$OUT" <<'EOF'
import json, shutil, sys
from pathlib import Path
from dsla_jax.training.ordering import compare_orders
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
result = {"runs": {}, "orderings": {}}
for d in sorted(p for p in runs.iterdir() if p.is_dir() and p.name not in ("orderings", "jax_cache")):
    if (d / "summary.json").is_file():
        result["runs"][d.name] = json.loads((d / "summary.json").read_text())
    if (d / "metrics.jsonl").is_file():
        shutil.copy(d / "metrics.jsonl", out / f"{d.name}_metrics.jsonl")
for f in sorted((runs / "orderings").glob("ordering_*.json")):
    result["orderings"][f.stem.removeprefix("ordering_")] = json.loads(f.read_text())
orders = {m: r["order"] for m, r in result["orderings"].items()}
if {"entropy", "sensitivity"} <= set(orders):
    result["order_comparison"] = compare_orders(orders["entropy"], orders["sensitivity"], (8, 15, 23))
(out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
EOF
  cp "$LOG" "$OUT/log.txt" 2>/dev/null || true
}

for item in $RUNS; do
  IFS=: read -r ordering mixer stages <<<"$item"
  stages=${stages:-0.25,0.5,0.75}
  name="${ordering}_${mixer}_${stages//[,.]/-}"
  out_dir="$RUN_DIR/$name"
  [ -f "$out_dir/summary.json" ] && continue
  left=$((TIME_LIMIT - ($(date +%s) - START)))
  if [ "$left" -lt 60 ]; then collect; exit 75; fi
  echo "=== $name ($left s left in this call)" | tee -a "$LOG"
  "$PYTHON" -m train.distill --config configs/smollm2_gpu.yaml --resume \
    model.spec="$MODEL" data.sources="[$TRAIN]" eval.sources="[$VALID]" \
    chain.ordering="$ordering" model.mixer="$mixer" chain.stages="[$stages]" \
    out_dir="$out_dir" ordering.cache_dir="$RUN_DIR/orderings" compile_cache="$RUN_DIR/jax_cache" \
    train.time_limit_s="$left" $EXTRA 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then collect; exit "$rc"; fi
done
collect
echo "all runs done: $RUNS" | tee -a "$LOG"
