"""int8 x int8 -> int32 block-sparse products: ``Y = act(dequant(Xq @ Wq^T) + bias) + residual``.

* **Weights**: int8, symmetric per output channel (``W[o, :] ~= w_scale[o] * Wq[o, :]``), as stored by an int8
  :class:`~sparsify.kernels.format.BlockSparseMatrix`; a float32 matrix is quantized once and cached on it.
* **Activations**: quantized per tensor to **u7**, ``Xq = clip(rint(X / s_x) + zp, 0, 127)`` with a zero point
  (asymmetric: GELU outputs are mostly positive). Dynamic (from the min / max of ``X``, 0 included) unless
  ``x_scale`` and ``x_zero_point`` are given (static calibration, e.g. from QAT; values outside are clipped).
  Why 7 bits: ``vpmaddubsw`` multiplies u8 x s8 and adds adjacent pairs into a *saturating* int16; with
  ``Xq <= 127`` a pair is at most ``2 * 127 * 128 = 32512 <= 32767``, so it never saturates (with u8 it would:
  ``2 * 255 * 127 = 64770``). int32 accumulation overflows only past ``K = 2**31 / (127 * 128) ~ 132k`` inputs.
* **Accumulation**: int32; then ``Y = s_x * w_scale[o] * (acc - zp * sum_k Wq[o, k]) + bias`` in float32, with
  the same fused GELU / residual epilogues as :func:`~sparsify.kernels.spmm.spmm`.
* **Backends**: ``"avx2"`` (explicit ``vpmaddubsw`` / ``vpmaddwd`` LLVM intrinsics, blocks ``(4k)x1``, chosen
  when the CPU and numba's target have AVX2) or ``"portable"`` (a plain numba int32 loop, any block shape).

Error against float64 on the dequantized weight (stated in the tests): ``|y - ref| <= s_x / 2 * sum_k |W[o, k]|``
(+ float32 rounding), times 1.13 (GELU's Lipschitz bound) with ``activation="gelu"``.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from .format import BlockSparseMatrix
from .spmm import (_ACT, TILE_TOKENS, _cached_plan, _check_x, _counter, _flags, _output, gelu_reference,
                   zeros_aligned)
from .threads import get_num_threads

__all__ = ["spmm_int8", "quantize_activations", "reference_spmm_int8", "has_avx2", "int8_backend", "QMAX"]

QMAX = 127  # u7 activations


@functools.lru_cache(maxsize=None)
def has_avx2() -> bool:
    """True when this CPU has AVX2 and numba compiles for it (``NUMBA_CPU_NAME`` unset or ``host``)."""
    from llvmlite import binding as llvm
    from numba import config

    name = getattr(config, "CPU_NAME", None)
    if name not in (None, "", "host"):
        return "+avx2" in str(getattr(config, "CPU_FEATURES", "") or "")
    try:
        return bool(llvm.get_host_cpu_features().get("avx2", False))
    except RuntimeError:  # features unknown on this platform
        return False


def int8_backend(w: BlockSparseMatrix, backend: str = "auto") -> str:
    """The backend :func:`spmm_int8` uses for ``w``: ``"avx2"`` or ``"portable"``."""
    if backend not in ("auto", "avx2", "portable"):
        raise ValueError(f"backend must be 'auto', 'avx2' or 'portable', got {backend!r}")
    br, bc = w.block
    fits = bc == 1 and br % 4 == 0
    if backend == "avx2":
        if not fits:
            raise ValueError(f"the avx2 int8 kernel needs (4k)x1 blocks (out x in), got {br}x{bc}")
        if not has_avx2():
            raise ValueError("the avx2 int8 kernel needs a CPU with AVX2 (and numba targeting it)")
        return "avx2"
    if backend == "portable":
        return "portable"
    return "avx2" if fits and has_avx2() else "portable"


def quantize_activations(
    x: np.ndarray, scale: float | None = None, zero_point: int | None = None
) -> tuple[np.ndarray, float, int]:
    """u7 per-tensor quantization: ``(q uint8 in [0, 127], scale, zero_point)`` with ``x ~= scale * (q - zp)``,
    ``q = clip(rint(x / scale) + zp, 0, 127)``: round half to even (as torch's fake quantization), NaN -> 0.

    Dynamic (``scale = (max(x, 0) - min(x, 0)) / 127``) unless both ``scale`` and ``zero_point`` are given."""
    x = np.asarray(x, dtype=np.float32)
    scale, zero_point = _act_params(x, scale, zero_point)
    with np.errstate(invalid="ignore", over="ignore"):
        y = x * np.float32(1.0 / scale)
        q = np.rint(np.minimum(y, np.float32(32767.0))) + np.float32(zero_point)  # round half to even
        q = np.where(np.isnan(y), 0, np.clip(q, 0, QMAX))
    return q.astype(np.uint8), scale, zero_point


_LAST_STATIC = None  # ((types and values of x_scale, x_zero_point), checked result): a model reuses its pair


def _check_static(scale, zero_point) -> tuple[float, int]:
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"x_scale must be a positive finite float, got {scale}")
    if isinstance(zero_point, bool) or int(zero_point) != zero_point or not 0 <= int(zero_point) <= QMAX:
        raise ValueError(f"x_zero_point must be an int in [0, {QMAX}], got {zero_point!r}")
    return np.float32(scale).item(), int(zero_point)


def _act_params(x: np.ndarray, scale, zero_point) -> tuple[float, int]:
    if (scale is None) != (zero_point is None):
        raise ValueError("give both x_scale and x_zero_point, or neither (dynamic quantization)")
    global _LAST_STATIC
    if scale is not None:
        key = (type(scale), scale, type(zero_point), zero_point)
        last = _LAST_STATIC
        if last is not None and last[0] == key:  # the same static pair as the previous call: already checked
            return last[1]
        result = _check_static(scale, zero_point)
        _LAST_STATIC = (key, result)
        return result
    if x.size == 0:
        return 1.0, 0
    lo, hi = x.min(), x.max()  # numpy's SIMD reductions (a numba loop measured 2-5x slower)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("x contains NaN or inf")
    scale = (hi - lo) / QMAX if hi > lo else 1.0
    scale = np.float32(scale).item()
    zp = int(min(max(round(-lo / scale), 0), QMAX))
    return scale, zp


def _prepared(w: BlockSparseMatrix) -> dict:
    """int8 weight + row sums (+ the quad layout of the avx2 kernel), cached on ``w``."""
    cache = w._cache.get("int8x8")
    if cache is not None:
        return cache
    q = w if w.dtype == np.int8 else w.quantize()
    br, bc = q.block
    nbr = q.out_features // br
    counts = np.diff(q.indptr).astype(np.int64)
    row_of = np.repeat(np.arange(nbr), counts)
    # sum_k Wq[o, k] for the zero-point correction
    rowsum = np.zeros(q.out_features, np.int64)
    if q.nnz_blocks:
        per = q.data.astype(np.int64).sum(axis=2)  # (nnzb, br)
        np.add.at(rowsum.reshape(nbr, br), row_of, per)
    bias = w.bias if w.bias is not None else np.zeros(w.out_features, np.float32)
    cache = dict(q=q, rowsum=rowsum.astype(np.int32), bias=bias)
    if bc == 1 and br % 4 == 0:
        nq = (counts + 3) // 4
        qptr = np.zeros(nbr + 1, np.int64)
        np.cumsum(nq, out=qptr[1:])
        n_quads = int(qptr[-1])
        pos = np.arange(q.nnz_blocks) - q.indptr[:-1].astype(np.int64)[row_of]
        slot = qptr[:-1][row_of] * 4 + pos  # quad * 4 + lane
        qidx = np.zeros(n_quads * 4, np.int32)  # padding lanes: column 0, weight 0
        qidx[slot] = q.indices
        qw = np.zeros((n_quads * 4, br), np.int8)
        qw[slot] = q.data[:, :, 0]
        qw = np.ascontiguousarray(qw.reshape(n_quads, 4, br).transpose(0, 2, 1))  # (quad, row, lane)
        cache.update(qptr=qptr.astype(np.int32), qidx=qidx, qw=qw)
    w._cache["int8x8"] = cache
    return cache


_local = threading.local()
_QUAD_BYTES = 16 * 1024  # quads (indices + int8 weights) of one sub-chunk of block rows in the avx2 kernel
_ACC_ROWS = 256  # rows of int32 + float32 accumulators per sub-chunk: 2 x 64 KB
_J = None  # the jitted module, imported on first call
_EMPTY2 = np.zeros((1, 1), np.float32)


def _workspace(n_workers: int, k: int, rows: int):
    """Per-thread scratch of exactly these shapes (C-contiguous, so the jitted loops see contiguous rows),
    reused across calls (fresh allocations would page-fault on every call)."""
    cache = getattr(_local, "ws", None)
    if cache is None:
        cache = _local.ws = {}
    key = (n_workers, k, rows)
    ws = cache.get(key)
    if ws is None:
        if len(cache) > 16:
            cache.clear()
        T = TILE_TOKENS
        ws = cache[key] = (zeros_aligned((n_workers, k, T), np.uint8), zeros_aligned((n_workers, rows, T), np.int32),
                           zeros_aligned((n_workers, rows, T), np.float32))
    return ws


def _vectors(n_out: int):
    """Per-thread per-call vectors (s_x * weight scales, -zp * row sums, min / max scratch): calls from several
    Python threads never share them."""
    cache = getattr(_local, "vec", None)
    if cache is None:
        cache = _local.vec = {}
    v = cache.get(n_out)
    if v is None:
        if len(cache) > 16:
            cache.clear()
        v = cache[n_out] = (np.empty(n_out, np.float32), np.empty(n_out, np.int32), np.zeros(24, np.float32))
    return v


_PARALLEL_MINMAX = 1 << 16  # values of x from which the dynamic min / max pass is split over the workers


def _minmax_rows(n_workers: int) -> np.ndarray:
    """Per-thread (n_workers, 24) float32 scratch of the parallel min / max pass."""
    cache = getattr(_local, "minmax", None)
    if cache is None or cache.shape[0] != n_workers:
        cache = _local.minmax = np.zeros((n_workers, 24), np.float32)
    return cache


def spmm_int8(
    x: np.ndarray,
    w: BlockSparseMatrix,
    *,
    activation: str | None = None,
    residual: np.ndarray | None = None,
    out: np.ndarray | None = None,
    threads: int | None = None,
    x_scale: float | None = None,
    x_zero_point: int | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """int8 x int8 ``act(x @ W^T + bias) + residual`` for float32 ``x`` ``(tokens, in_features)``.

    ``x`` is quantized per tensor to u7 inside the kernel's packing step (see the module docstring);
    ``x_scale`` / ``x_zero_point`` fix the quantization (static), else it is computed from ``x``. ``w`` int8 (or
    float32, quantized once and cached on it). Other arguments as :func:`~sparsify.kernels.spmm.spmm`.
    """
    if not isinstance(w, BlockSparseMatrix):
        raise ValueError(f"w must be a BlockSparseMatrix, got {type(w).__name__}")
    x = _check_x(x, w.in_features)
    if activation not in _ACT:
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    kind = int8_backend(w, backend)
    M = x.shape[0]
    out = _output(x, w, residual, out)
    static = x_scale is not None or x_zero_point is not None
    if static:
        s_x, zp = _act_params(x, x_scale, x_zero_point)
    if M == 0:
        return out
    if threads is not None:
        from .threads import num_threads

        with num_threads(threads):
            return _run(x, w, kind, activation, residual, out, s_x if static else None, zp if static else None)
    return _run(x, w, kind, activation, residual, out, s_x if static else None, zp if static else None)


def _int8_plan(w: BlockSparseMatrix, prep: dict, M: int, n_threads: int) -> tuple:
    """(block rows per block, block rows per task, tasks, workers, accumulator rows (portable), block rows per
    quad sub-chunk (avx2)) for ``w`` on M tokens with n_threads."""
    q = prep["q"]
    br = q.block[0]
    nbr = q.out_features // br
    n_tiles = -(-M // TILE_TOKENS)
    # A task = (tile, chunk of block rows); rows are split only as far as needed to give every thread the same
    # number of tasks, so a tile is packed as few times as possible. Inside a task, sub-chunks of _ACC_ROWS rows
    # keep the accumulators in L2.
    n_chunks = min(nbr, n_threads // math.gcd(n_tiles, n_threads))
    chunk = -(-nbr // n_chunks)
    n_tasks = n_tiles * -(-nbr // chunk)
    sub_rows = max(br, min(chunk * br, _ACC_ROWS // br * br))
    qsub = 1
    if "qptr" in prep and q.in_features <= 1024:
        # Block rows whose quads take about _QUAD_BYTES, reused by the 4 slabs of a tile (slabs outside the block
        # rows: the stores of consecutive calls stay in the same 16 rows of out, 1.07-1.22x faster at out = 1536 /
        # 3072 wide). With K > 1024 the u7 tile leaves L1, and one block row at a time (its X lines re-read from
        # L1 by the 4 slabs) was 1.0-1.05x faster (1 thread, CPU time).
        per_row = max(1.0, len(prep["qidx"]) / 4 / max(1, len(prep["qptr"]) - 1)) * (16 + 4 * br)
        qsub = max(1, int(_QUAD_BYTES // per_row))
    return br, chunk, n_tasks, min(n_threads, n_tasks), sub_rows, qsub


def _run(x, w, kind, activation, residual, out, s_x, zp):
    global _J
    if _J is None:
        from . import _jit_int8

        _J = _jit_int8
    prep = _prepared(w)
    q = prep["q"]
    M = x.shape[0]
    n_threads = get_num_threads()
    br, chunk, n_tasks, n_workers, sub_rows, qsub = _cached_plan(w, ("int8", M, n_threads), _int8_plan, w, prep, M,
                                                                 n_threads)
    xt_ws, iacc_ws, facc_ws = _workspace(n_workers, q.in_features, sub_rows if kind != "avx2" else br)
    if s_x is None:  # dynamic: min / max, scale, zero point and the per-channel vectors in one jitted call
        cscales, init, res16 = _vectors(q.out_features)
        if n_workers > 1 and x.size >= _PARALLEL_MINMAX:
            res = _minmax_rows(n_workers)
            s_x, zp = _J.qparams_parallel(x, q.scales, prep["rowsum"], QMAX, cscales, init, res)
            bad = res[0, 16] != 0.0
        else:
            s_x, zp = _J.qparams(x, q.scales, prep["rowsum"], QMAX, cscales, init, res16)
            bad = res16[16] != 0.0
        tail = x.reshape(-1)[x.size - x.size % 8:]
        if bad or (tail.size and not np.isfinite(tail).all()):
            raise ValueError("x contains NaN or inf")
        inv_s = np.float32(1.0 / s_x)
    else:  # static: 1 / s_x and the per-channel vectors depend on (s_x, zp) only, kept for the last pair seen
        static = prep.get("static")
        if static is None or static[0] != (s_x, zp):
            static = prep["static"] = ((s_x, zp), q.scales * np.float32(s_x), prep["rowsum"] * np.int32(-zp),
                                       np.float32(1.0 / s_x))
        _, cscales, init, inv_s = static
    resid = residual if residual is not None else _EMPTY2
    if kind == "avx2":
        fn = _J.spmm_i8_direct if n_workers > 1 else _J.spmm_i8_direct_serial
        fn(x, inv_s, zp, prep["qptr"], prep["qidx"], prep["qw"], br, init, cscales, prep["bias"], resid, out,
           _ACT[activation] | (0 if residual is None else 2), chunk, qsub, n_tasks, xt_ws, _counter())
    else:
        flags = _flags((1, w.bias is not None, _ACT[activation], residual is not None))
        _J.spmm_i8_portable(x, inv_s, zp, q.indptr, q.indices, q.data, prep["rowsum"], cscales, prep["bias"],
                            resid, out, flags, chunk, n_tasks, xt_ws, iacc_ws, facc_ws)
    return out


def reference_spmm_int8(
    x: np.ndarray,
    w: BlockSparseMatrix,
    *,
    activation: str | None = None,
    residual: np.ndarray | None = None,
    x_scale: float | None = None,
    x_zero_point: int | None = None,
) -> np.ndarray:
    """Naive float64 reference of the quantized computation: the u7-dequantized ``x`` times the dequantized
    int8 weight (the kernel differs from it by float32 rounding only)."""
    q = _prepared(w)["q"]
    xq, s, zp = quantize_activations(x, x_scale, x_zero_point)
    xd = s * (xq.astype(np.float64) - zp)
    y = xd @ q.to_dense().astype(np.float64).T
    if q.bias is not None:
        y += q.bias
    if activation == "gelu":
        y = gelu_reference(y)
    if residual is not None:
        y += residual
    return y
