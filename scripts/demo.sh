#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M on real text (creates .venv on first use).
source "$(dirname "$0")/env.sh"
python -m dsla_jax.generate --model smollm2-135m --chat --greedy --max-new-tokens 48 \
  --prompt "What is the capital of France?"
python -m eval.perplexity --model smollm2-135m --text builtin:hamlet --window 512 --max-tokens 8192 \
  --json out/demo_perplexity.json
