"""Where one kernel call's time goes, fp32 ``spmm`` against static int8 ``spmm_int8`` (a measurement, not a test).

    python scripts/kernel_call_split.py [--shapes 384x384,384x1536] [--tokens 128] [--threads 2] [--rounds 9]

Wall time per call (median over rounds of batches of calls, the two paths interleaved), split into:
``call`` the public function; ``jitted`` its jitted entry called directly with the same prepared arguments (the
difference is the Python wrapper: checks, plan and workspace lookups, argument unboxing); ``pack`` the packing of
X alone (fp32 slab-major tiles / u7 group-major tiles, one thread, all tiles), part of ``jitted``. 4x1 blocks at
90%, the benchmark's random matrices. Uses private functions of ``sparsify.kernels``: it measures them.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kernel_call_split.py", description=__doc__.split("\n\n")[2])
    p.add_argument("--shapes", default="384x384,384x1536")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)

    from numba import njit

    from sparsify.kernels import _jit as J
    from sparsify.kernels import _jit_int8 as J8
    from sparsify.kernels import int8 as I
    from sparsify.kernels import spmm as S
    from sparsify.kernels.bench import make_weight
    from sparsify.kernels.format import BlockSparseMatrix
    from sparsify.kernels.threads import set_num_threads

    @njit
    def pack32(n, x, xs, tile):
        for _ in range(n):
            for t0 in range(0, x.shape[0], tile):
                J.pack_slabs(x, t0, min(tile, x.shape[0] - t0), xs)

    @njit
    def pack8(n, x, xg, inv_s, zp):
        for _ in range(n):
            for t0 in range(0, x.shape[0], 64):
                J8.pack_tile_u7g(x, t0, min(64, x.shape[0] - t0), inv_s, zp, xg)

    set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    M = args.tokens
    s_x, zp = 0.05, 60
    for shape in args.shapes.split(","):
        n_out, n_in = (int(v) for v in shape.split("x"))
        w, _ = make_weight(n_out, n_in, (4, 1), 0.9, rng)
        m = BlockSparseMatrix.from_dense(w, (4, 1), bias=rng.standard_normal(n_out).astype(np.float32))
        x = rng.standard_normal((M, n_in)).astype(np.float32)
        out = np.empty((M, n_out), np.float32)
        S.spmm(x, m, out=out)
        I.spmm_int8(x, m, out=out, x_scale=s_x, x_zero_point=zp)
        f32, ip, ix, data, scales, bias, tile, chunk, sub, n_tasks, n_workers, xs_size, wide = \
            m._cache["plans"][("direct", M, args.threads)]
        xs_ws = S._direct_workspace(n_workers, xs_size)
        w_ws = S._widen_workspace(n_workers, wide)
        prep = I._prepared(m)
        br, chunk8, n_tasks8, n_workers8, sub_rows, qsub = m._cache["plans"][("int8", M, args.threads)]
        xt_ws = I._workspace(n_workers8, n_in, br)[0]
        _, cs, init, _ = prep["static"]
        i8 = J8.spmm_i8_direct if n_workers8 > 1 else J8.spmm_i8_direct_serial
        inv_s = np.float32(1.0 / s_x)
        xg = S.zeros_aligned((n_in, 64), np.uint8)
        xs = S.zeros_aligned((tile * n_in,), np.float32)
        calls = {
            "fp32 call": lambda: S.spmm(x, m, out=out),
            "fp32 jitted": lambda: f32(x, ip, ix, data, scales, bias, S._EMPTY2, out, 0, tile, chunk, sub, n_tasks,
                                       xs_ws, S._counter(), w_ws),
            "fp32 pack": lambda: pack32(1, x, xs, tile),
            "int8 call": lambda: I.spmm_int8(x, m, out=out, x_scale=s_x, x_zero_point=zp),
            "int8 jitted": lambda: i8(x, inv_s, zp, prep["qptr"], prep["qidx"], prep["qw"], br, init, cs, prep["bias"],
                                      I._EMPTY2, out, 0, chunk8, qsub, n_tasks8, xt_ws, S._counter()),
            "int8 pack": lambda: pack8(1, x, xg, inv_s, zp),
        }
        n = max(20, int(2e6 // (M * n_in * n_out * 0.1 / 1e3 + 1)))
        ts = {k: [] for k in calls}
        for f in calls.values():
            f()
        for _ in range(args.rounds):
            for k, f in calls.items():
                t = time.perf_counter()
                for _ in range(n):
                    f()
                ts[k].append((time.perf_counter() - t) / n * 1e6)
        med = {k: float(np.median(v)) for k, v in ts.items()}
        less_pack = ((med["fp32 jitted"] - med["fp32 pack"] / args.threads)
                     / (med["int8 jitted"] - med["int8 pack"] / args.threads))
        print(f"{shape} M={M} threads={args.threads} (us per call, median of {args.rounds} x {n}): "
              + ", ".join(f"{k} {v:.1f}" for k, v in med.items())
              + f"; fp32 / int8: call {med['fp32 call'] / med['int8 call']:.2f}, jitted "
              f"{med['fp32 jitted'] / med['int8 jitted']:.2f}, jitted less pack / threads {less_pack:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
