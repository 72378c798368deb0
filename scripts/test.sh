#!/usr/bin/env bash
# Install twa with its test dependencies and run the test suite (CPU only, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[test]"
python -m pytest "$@"
