#!/usr/bin/env bash
# The test command: sets everything up from nothing, lints, runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ci_services.sh   # PostgreSQL server + Chromium for the serving tests (apt, when missing)
. .venv/bin/activate
ruff check deepseek tests benchmarks
python -m pytest "$@"
