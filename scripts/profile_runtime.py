"""Where the CPU runtime spends its time on an artifact (a measurement, not a test).

    python scripts/profile_runtime.py ARTIFACT [THREADS]

Runs batch 32 x 128 random tokens five times after a warm-up, with and without the artifact's length
configuration, and prints the time per batch and the share of each runtime step: the block-sparse SpMM kernels,
attention, the layer norms (with their fused quantization points), the remaining fake-quantization passes, token
dropping and the embeddings. Each step is timed by wrapping the function the runtime calls.
"""

from __future__ import annotations

import collections
import sys
import time

import numpy as np


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__.split("\n\n")[1].strip())
        return 2
    import sparsify.kernels.spmm as kernels
    import sparsify.runtime.attention as attention
    import sparsify.runtime.model as model
    from sparsify.runtime import SparseModel, ops

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - t
            return out

        setattr(module, name, wrapper)

    for module, name in ((kernels, "spmm"), (attention, "attention"), (model, "_norm"), (model, "_fq"),
                         (model, "_drop_tokens"), (ops, "embed_layernorm")):
        timed(module, name)
    threads = int(argv[1]) if len(argv) > 1 else 2
    sm = SparseModel.from_pretrained(argv[0], threads=threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, min(20000, sm.word.shape[0]), (32, 128))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = np.ones_like(ids)
    for config in ("default", None):
        sm(ids, mask, length_config=config)  # warm-up (compilation, caches)
        spent.clear()
        t = time.perf_counter()
        for _ in range(5):
            sm(ids, mask, length_config=config)
        total = (time.perf_counter() - t) / 5
        parts = ", ".join(f"{k} {v / 5 * 1e3:.0f} ms ({v / 5 / total:.0%})" for k, v in sorted(spent.items(), key=lambda x: -x[1]))
        label = "its length configuration" if config == "default" else "full length"
        print(f"{label}: {total * 1e3:.0f} ms per batch of 32 x 128, {threads} threads; {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
