#!/usr/bin/env bash
# Refresh the pins of the test environment: requirements/test.lock (pyproject.toml's [test] extra, torch and
# everything they need) and requirements/transformers4.lock (the transformers 4.x side environment, from
# requirements/transformers4.in). Both are for Linux x86_64 and CPython 3.11, the CI machine.
#
#   bash scripts/lock.sh                       # every pin to the newest release the bounds allow
#   bash scripts/lock.sh --upgrade-package X   # (or any other `uv pip compile` flag) instead of upgrading all
#
# uv resolves; pip installs (scripts/test.sh). uv does not read pip's configuration, so the indexes, local
# wheel folders and constraints pip is configured with (`pip config list`, e.g. a local torch build and a cap
# on its version) are handed to it here: the lock then names what pip on this machine installs.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d "${TMPDIR:-/tmp}/twa-lock.XXXXXX")
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet "uv>=0.5"
mapfile -t pip_config < <("$tools/venv/bin/python" - <<'PY'
import shlex, subprocess, sys
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
for line in out.splitlines():
    key, _, value = line.partition("=")
    flag = flags.get(key.rsplit(".", 1)[-1])
    if flag:
        for item in shlex.split(shlex.split(value)[0] if value else ""):
            print(flag)
            print(item)
PY
)
upgrade=(--upgrade)
[ "$#" -gt 0 ] && upgrade=("$@")
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match
        --custom-compile-command "bash scripts/lock.sh" --quiet "${pip_config[@]}" "${upgrade[@]}")
"$tools/venv/bin/uv" pip compile pyproject.toml --extra test -o requirements/test.lock "${common[@]}"
"$tools/venv/bin/uv" pip compile requirements/transformers4.in -o requirements/transformers4.lock "${common[@]}"
for lock in requirements/test.lock requirements/transformers4.lock; do
  sed -i '2a #    (for Linux x86_64 and CPython 3.11; pip installs it: scripts/test.sh)' "$lock"
done
echo "pinned $(grep -c '==' requirements/test.lock) packages in requirements/test.lock and" \
     "$(grep -c '==' requirements/transformers4.lock) in requirements/transformers4.lock"
