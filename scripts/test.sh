#!/usr/bin/env bash
# Run the test suite (creates .venv on first use). Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
