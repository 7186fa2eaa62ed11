#!/usr/bin/env bash
# Runs the test suite against the newest releases that pyproject.toml's ranges allow, in a separate venv
# (.venv-latest), so that a new release that breaks the project shows up here before a user meets it.
#   bash scripts/latest.sh                 newest releases, then the tests
#   bash scripts/latest.sh --write-lock    the same, and when every test passes, requirements/lock.txt is
#                                          rewritten from that venv (how the lock is refreshed; commit it)
# Extra arguments after the flags go to pytest (e.g. -x -k kernels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
write_lock=""
if [ "${1:-}" = "--write-lock" ]; then write_lock=1; shift; fi
export SPARSIFY_VENV=.venv-latest SPARSIFY_UNLOCKED=1
rm -rf .venv-latest
bash scripts/setup.sh
offline=${SPARSIFY_OFFLINE_ENV:-../shared/offline-env.sh}
# shellcheck disable=SC1090
if [ -f "$offline" ]; then source "$offline"; fi
.venv-latest/bin/pytest -p no:cacheprovider "$@"
if [ -n "$write_lock" ]; then
  .venv-latest/bin/python scripts/write_lock.py .venv-latest/bin/python requirements/lock.txt
  git --no-pager diff --stat -- requirements/lock.txt || true
fi
