#!/usr/bin/env bash
# Lint, then run the test suite (creates .venv on first use). Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
ruff check dsla_jax train eval bench tests
python -m pytest -q "$@"
