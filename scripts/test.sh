#!/usr/bin/env bash
# The test suite (what CI runs): install with the test extras, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,hf,eval,plot
ruff check src tests
python -m pytest -q -ra "$@"
