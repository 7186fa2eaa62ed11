#!/usr/bin/env bash
# The README's first command: set up, then the whole job end to end on a small default: train (fine-tune while
# pruning to 50% in 4x1 blocks), report the measured sparsity, export the compressed artifact, classify a few
# sentences with the CPU runtime, and time the runtime against PyTorch on the same model, side by side.
# Without Hugging Face Hub access, point SPARSIFY_OFFLINE_ENV at a script that sets HF_HUB_OFFLINE and the
# cache variables (on the project's build machines: ../shared/offline-env.sh, used when present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
offline=${SPARSIFY_OFFLINE_ENV:-../shared/offline-env.sh}
# shellcheck disable=SC1090
if [ -f "$offline" ]; then source "$offline"; fi
run=runs/quickstart
step() { printf '\n== %s\n' "$*"; }
step "train: recipes/quickstart.yaml -> $run"
.venv/bin/sparsify train recipes/quickstart.yaml --overwrite
step "sparsity measured from the saved weights"
.venv/bin/sparsify report "$run"
step "export the compressed artifact"
.venv/bin/sparsify export "$run" -o "$run/artifact" --overwrite
step "classify with the CPU runtime (block-sparse kernels)"
.venv/bin/sparsify predict "$run/artifact" --text "a gripping, beautifully acted film" \
  --text "the plot is thin and the jokes fall flat" --text "not bad at all"
step "runtime vs PyTorch fp32 on the same weights (median ratio over 5 interleaved rounds, [IQR])"
.venv/bin/sparsify bench model "$run/artifact" --methods sparsify,torch_fp32 --rounds 5 --sst2-batches 2 \
  --no-cold-start --json "$run/bench.json"
echo
echo "run: $run (metrics.json, model/, TensorBoard: tensorboard --logdir $run)  artifact: $run/artifact  timings: $run/bench.json"
