#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (Debian
# packages, Go-built daemons cached by version outside git, the Python venv), runs
# the static checks, then every test tier (unit, real BuildKit + registry, real
# Kubernetes control plane, slow scenarios). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$SECONDS
step() { printf '\n=== %s (%ss)\n' "$*" "$((SECONDS - t0))"; }

step "install test bed"
scripts/install-testbed.sh all
step "python environment"
scripts/bootstrap-python.sh

step "generated protobuf modules are current"
.venv/bin/python scripts/gen_protos.py --check
step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
step "mypy (strict)"
.venv/bin/mypy

step "pytest"
set +e
.venv/bin/python -m pytest -ra -p no:cacheprovider "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
step "done (pytest exit $rc)"
exit $rc
