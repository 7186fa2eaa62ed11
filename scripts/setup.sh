#!/usr/bin/env bash
# Creates .venv/ with the CPU build of torch and sparsify (editable) with its test and notebook extras.
#   bash scripts/setup.sh            (TORCH_SPEC="torch==2.13.0" by default: override to pick another build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first: the CPU build. An unpinned torch pulled in by another package would fetch a multi-GB CUDA build.
pip install "${TORCH_SPEC:-torch==2.13.0}"
pip install -e ".[dev]"
.venv/bin/python -c "import torch, sparsify; print(f'sparsify {sparsify.__version__} with torch {torch.__version__} in .venv')"
