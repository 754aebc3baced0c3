"""Evaluation entry points: perplexity, speed (and later long-context benchmarks)."""
