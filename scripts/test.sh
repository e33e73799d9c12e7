#!/usr/bin/env bash
# Sets up everything the tests need, then runs lint, the layer contract and the test suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."

LLMHOST_EXTRAS=dev,transformers ./scripts/install.sh

echo "[test] ruff" >&2
.venv/bin/ruff check src tests benchmarks
echo "[test] import layers" >&2
.venv/bin/lint-imports --no-cache
echo "[test] pytest" >&2
.venv/bin/python -m pytest "$@"
