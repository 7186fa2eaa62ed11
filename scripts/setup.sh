#!/usr/bin/env bash
# Creates .venv/ with the CPU build of torch and sparsify (editable) with its test and notebook extras, every
# package at the version pinned in requirements/lock.txt (a release after the lock cannot break the install).
#   bash scripts/setup.sh            (TORCH_SPEC="torch==2.13.0" by default: override to pick another build)
#   SPARSIFY_UNLOCKED=1 bash ...     newest releases within pyproject.toml's ranges (what scripts/latest.sh tests)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
venv=${SPARSIFY_VENV:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# torch first: the CPU build. An unpinned torch pulled in by another package would fetch a multi-GB CUDA build.
pip install "${TORCH_SPEC:-torch==2.13.0}"
if [ -n "${SPARSIFY_UNLOCKED:-}" ]; then
  pip install --upgrade --upgrade-strategy eager -e ".[dev]"
else
  pip install -c requirements/lock.txt -e ".[dev]"
fi
"$venv/bin/python" -c "import torch, sparsify; print(f'sparsify {sparsify.__version__} with torch {torch.__version__} in $venv')"
