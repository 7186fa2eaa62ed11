"""Latency of the CPU runtime at a few length configurations (a measurement for docs/results.md, not a test).

    python scripts/latency_probe_sst2.py ARTIFACT [--examples 256] [--batch-size 32] [--repeats 7] [--threads 2]

Runs the first N SST-2 validation sentences through ``SparseModel.logits`` at full length and at each
configuration below, interleaved, and prints each median (min-max) and its fraction of the full-length median.
Tokenization is inside the timed call for every configuration alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

CONFIGS = {
    "full length": None,
    "[0.5, 0.25, 0.1, 0.05, 0.05, 0.05]": [0.5, 0.25, 0.1, 0.05, 0.05, 0.05],
    "[0.85, 0.85, 0.55, 0.55, 0.45, 0.35]": [0.85, 0.85, 0.55, 0.55, 0.45, 0.35],
    "[0.95, 0.7, 0.6, 0.55, 0.45, 0.35]": [0.95, 0.7, 0.6, 0.55, 0.45, 0.35],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="a directory written by 'sparsify export' (a 6-layer model)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from datasets import load_dataset

    from sparsify.runtime import SparseModel

    model = SparseModel.from_pretrained(args.artifact, threads=args.threads)
    texts = list(load_dataset("nyu-mll/glue", "sst2", split="validation")["sentence"])[:args.examples]

    def run(cfg):
        model.logits(texts, batch_size=args.batch_size, max_length=64, length_config=cfg)

    for cfg in CONFIGS.values():  # warm-up
        run(cfg)
    times = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, cfg in CONFIGS.items():
            started = time.perf_counter()
            run(cfg)
            times[name].append(time.perf_counter() - started)
    full = float(np.median(times["full length"]))
    for name, t in times.items():
        print(f"{name}: median {np.median(t) * 1e3:.0f} ms ({min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}), "
              f"{np.median(t) / full:.3f} of full length")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
