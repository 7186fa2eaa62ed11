#!/usr/bin/env bash
# The README's first command: set up, then run the quickstart recipe end to end and print its report.
# Without Hugging Face Hub access, point SPARSIFY_OFFLINE_ENV at a script that sets HF_HUB_OFFLINE and the
# cache variables (on the project's build machines: ../shared/offline-env.sh, used when present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
offline=${SPARSIFY_OFFLINE_ENV:-../shared/offline-env.sh}
# shellcheck disable=SC1090
if [ -f "$offline" ]; then source "$offline"; fi
.venv/bin/sparsify train recipes/quickstart.yaml --overwrite
.venv/bin/sparsify report runs/quickstart
echo "metrics: runs/quickstart/metrics.json  model: runs/quickstart/model  TensorBoard: tensorboard --logdir runs/quickstart"
