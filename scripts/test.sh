#!/usr/bin/env bash
# Install twa with its test dependencies (the real transformers, timm and Lightning the integration tests write
# checkpoints with, and transformers 4.57 beside them, for the test that results load in 4.x too) and run the
# test suite (CPU only, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[test]"
if [ ! -d .cache/transformers4/transformers ]; then
  python -m pip install --quiet --no-deps --target .cache/transformers4 \
    "transformers==4.57.*" "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<0.23"
fi
python -m pytest "$@"
