#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its dev extras into it.
# Re-running is cheap: pip skips what is already satisfied.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
