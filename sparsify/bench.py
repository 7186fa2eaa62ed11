"""``sparsify bench WHAT ...``: the benchmarks, each with its own options."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "kernels": ("sparsify.kernels.bench", "block-sparse SpMM against torch dense / CSR and DeepSparse"),
    "model": ("sparsify.bench_model", "an exported artifact against PyTorch, onnxruntime and DeepSparse"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in BENCHMARKS:
        print("usage: sparsify bench {" + ",".join(BENCHMARKS) + "} [options]\n", file=sys.stderr)
        for name, (_, text) in BENCHMARKS.items():
            print(f"  {name:10s} {text}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(BENCHMARKS[argv[0]][0]).main(argv[1:])
