#!/usr/bin/env bash
# Install the pinned test environment into the active Python environment and run the test suite (CPU only,
# a few minutes on 2 cores). Arguments go to pytest.
#
# - requirements/test.lock: every package the tests use (twa's dependencies, the real transformers, timm and
#   Lightning the integration tests write checkpoints with, pytest, ruff), pinned; then twa itself, editable.
#   `pip check` then proves the set complete and consistent.
# - requirements/transformers4.lock: transformers 4.57 and its own dependencies, installed apart into
#   $TWA_TRANSFORMERS4 (default .cache/transformers4) with links to the main environment's torch only, for
#   the test that results load in 4.x too (scripts/transformers4_env.py; remade when the lock changes).
# Refresh the pins with scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps -r requirements/test.lock
python -m pip install --quiet --no-deps --no-build-isolation -e .
python -m pip check
side="${TWA_TRANSFORMERS4:-.cache/transformers4}"
python scripts/transformers4_env.py "$side" requirements/transformers4.lock
export TWA_TRANSFORMERS4="$side"
python -m pytest "$@"
