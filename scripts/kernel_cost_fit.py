"""Fixed and marginal cost of the fp32 and int8 x int8 kernels (a measurement, not a test).

    python scripts/kernel_cost_fit.py [--shapes 384x384,768x768] [--tokens 1024] [--rounds 7] [--json PATH]

One thread, CPU time of the process, 4x1 blocks. For each shape, sparsities 50-99% are timed interleaved (fp32
``spmm``, and ``spmm_int8`` with a static activation scale, so no min / max pass), and each kernel's median time
is fitted by least squares as

    time = fixed x (output tiles of 4 rows x 16 tokens) + marginal x (work units x 16-token slabs)

where a work unit is a stored block for fp32 (4 rows x 1 input: 8 FMAs per slab) and a *quad* for int8 (4 rows x
4 inputs, padded per block row: 8 vpmaddubsw + 8 vpmaddwd per slab). The fixed part is what a tile costs whatever
its number of blocks: the pack or u7 quantization of X, the loop exit, the scale / bias / transpose and the 16
stores. It prints the fit, the predicted int8 / fp32 ratio at 90% and the measured one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[2], prog="kernel_cost_fit.py")
    p.add_argument("--shapes", default="384x384,768x768,768x3072")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from sparsify.kernels.bench import make_weight
    from sparsify.kernels.format import BlockSparseMatrix
    from sparsify.kernels.int8 import _prepared, spmm_int8
    from sparsify.kernels.spmm import _padded, spmm
    from sparsify.kernels.threads import set_num_threads

    set_num_threads(1)
    rng = np.random.default_rng(0)
    sparsities = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
    M = args.tokens
    results = []
    for shape in args.shapes.split(","):
        n_out, n_in = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((M, n_in)).astype(np.float32)
        out = np.empty((M, n_out), np.float32)
        slabs = -(-M // 16)
        tiles = (n_out // 4) * slabs
        rows = []
        for sp in sparsities:
            w, _ = make_weight(n_out, n_in, (4, 1), sp, rng)
            m = BlockSparseMatrix.from_dense(w, (4, 1))
            q = m.quantize()
            n_blocks = int(_padded(m)[0][-1])  # fp32 blocks as the kernel runs them (rows padded to 4)
            n_quads = int(_prepared(q)["qptr"][-1])
            calls = {"fp32": lambda m=m: spmm(x, m, out=out),
                     "int8": lambda q=q: spmm_int8(x, q, out=out, x_scale=0.05, x_zero_point=60)}
            n = max(3, int(3e9 // (M * n_in * n_out * (1 - sp) + 1e7)))
            ts = {k: [] for k in calls}
            for f in calls.values():
                f()
            for _ in range(args.rounds):
                for k, f in calls.items():
                    t = time.process_time()
                    for _ in range(n):
                        f()
                    ts[k].append((time.process_time() - t) / n * 1e9)  # ns
            rows.append(dict(sparsity=sp, blocks=n_blocks, quads=n_quads, **{f"{k}_ns": float(np.median(v))
                                                                             for k, v in ts.items()}))
        fit = {}
        for k, unit in (("fp32", "blocks"), ("int8", "quads")):
            a = np.array([[tiles, r[unit] * slabs] for r in rows], np.float64)
            y = np.array([r[f"{k}_ns"] for r in rows])
            (fixed, marginal), *_ = np.linalg.lstsq(a, y, rcond=None)
            resid = float(np.max(np.abs(a @ [fixed, marginal] - y) / y))
            fit[k] = dict(fixed_ns_per_tile=float(fixed), marginal_ns_per_unit_slab=float(marginal),
                          max_rel_residual=resid)
        r90 = next(r for r in rows if r["sparsity"] == 0.9)
        pred = {k: fit[k]["fixed_ns_per_tile"] * tiles + fit[k]["marginal_ns_per_unit_slab"] * r90[u] * slabs
                for k, u in (("fp32", "blocks"), ("int8", "quads"))}
        print(f"{shape} M={M}: fp32 {fit['fp32']['fixed_ns_per_tile']:.1f} ns/tile + "
              f"{fit['fp32']['marginal_ns_per_unit_slab']:.2f} ns/block-slab (max residual "
              f"{fit['fp32']['max_rel_residual']:.0%}); int8 {fit['int8']['fixed_ns_per_tile']:.1f} ns/tile + "
              f"{fit['int8']['marginal_ns_per_unit_slab']:.2f} ns/quad-slab ({fit['int8']['max_rel_residual']:.0%}); "
              f"at 90%: {r90['blocks'] / (n_out // 4):.1f} blocks / {r90['quads'] / (n_out // 4):.1f} quads per block "
              f"row, int8 / fp32 speedup fitted {pred['fp32'] / pred['int8']:.2f}, measured "
              f"{r90['fp32_ns'] / r90['int8_ns']:.2f}", flush=True)
        results.append(dict(shape=shape, tokens=M, tiles=tiles, slabs=slabs, rows=rows, fit=fit))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
