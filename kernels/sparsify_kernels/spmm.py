"""Block-sparse x dense products for Linear layers: ``Y = act(X @ W^T + bias) + residual``.

``X`` is ``(tokens, in_features)`` float32 row-major, ``W`` a :class:`~sparsify.kernels.format.BlockSparseMatrix`
(float32, or int8 with per-output-channel scales: int8 weights with float32 activations).

Design (see ``docs/kernels.md``): parallel over tasks = (tile of tokens) x (chunk of block rows) (one worker: a
serial jitted loop, no parallel launch). For ``(4k) x 1`` blocks (the
*direct* path; tasks handed out through an atomic counter) a task packs its tile slab-major (16 tokens contiguous per input column, so one pass over the
block rows for one slab touches ``K x 64 B`` of X and needs no K panels), and a register micro-kernel keeps
4 output rows x 16 tokens in ymm accumulators for a whole block row, then applies scale, bias, GELU (erf form)
and the residual in registers and stores the transposed tile straight into ``out``. Other block shapes take
the *accumulator* path: ``(rows, 64)`` accumulators, K panels, and a separate epilogue.

The jitted functions are private, compiled lazily on first call and cached on disk; the public functions check
every shape, dtype and contiguity first and raise ``ValueError``.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .format import BlockSparseMatrix
from .threads import get_num_threads

__all__ = ["spmm", "linear", "reference_spmm", "gelu_reference", "TILE_TOKENS"]

TILE_TOKENS = 64  # tokens per task (constant inner trip count)
_PANEL_BYTES = 256 * 1024  # packed X tile per panel: half of the 512 KB L2 of these cores
_ACC_BYTES = 128 * 1024

_ACT = {None: 0, "none": 0, "gelu": 1}



# ----------------------------------------------------------------------------------------- references
def gelu_reference(v: np.ndarray) -> np.ndarray:
    """GELU, erf form (as BERT), in float64: ``0.5 * v * (1 + erf(v / sqrt(2)))``."""
    from scipy.special import erf

    v = np.asarray(v, dtype=np.float64)
    return 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))


def reference_spmm(
    x: np.ndarray,
    w: BlockSparseMatrix,
    *,
    activation: str | None = None,
    residual: np.ndarray | None = None,
) -> np.ndarray:
    """Naive float64 reference: ``act(x @ W^T + bias) + residual`` through the dense weight."""
    y = np.asarray(x, np.float64) @ w.to_dense().astype(np.float64).T
    if w.bias is not None:
        y += w.bias
    if activation == "gelu":
        y = gelu_reference(y)
    if residual is not None:
        y += residual
    return y


# ----------------------------------------------------------------------------------------- workspace
_local = threading.local()
_ALIGN = 64  # bytes: a cache line


def empty_aligned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array whose first element starts a cache line. numpy only promises 16 bytes, and a packed
    tile read in 32 / 64-byte pieces from a base 16 bytes off a line splits loads across lines: measured 1.16-1.19x
    slower (fp32 and int8 kernels, 768x3072, 1024 tokens), and the offset changed from one process to the next."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + _ALIGN, np.uint8)
    a = (-buf.ctypes.data) % _ALIGN
    return buf[a:a + n].view(dtype).reshape(shape)


def zeros_aligned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """:func:`empty_aligned`, filled with zeros."""
    a = empty_aligned(shape, dtype)
    a.fill(0)
    return a


def _workspace(n_workers: int, panel: int, chunk_rows: int, chunk_brows: int):
    """Per-worker scratch (packed X tile, accumulator, row cursors), reused across calls of this Python thread
    (fresh large allocations would page-fault on every call)."""
    ws = getattr(_local, "ws", None)
    T = TILE_TOKENS
    if (
        ws is None
        or ws[0].shape[0] < n_workers
        or ws[0].shape[1] < panel
        or ws[1].shape[1] < chunk_rows
        or ws[2].shape[1] < chunk_brows
    ):
        old = ws if ws is not None else (np.empty((0, 0, T)), np.empty((0, 0, T)), np.empty((0, 0)))
        ws = (
            zeros_aligned((max(n_workers, old[0].shape[0]), max(panel, old[0].shape[1]), T), np.float32),
            zeros_aligned((max(n_workers, old[1].shape[0]), max(chunk_rows, old[1].shape[1]), T), np.float32),
            np.zeros((max(n_workers, old[2].shape[0]), max(chunk_brows, old[2].shape[1])), np.int64),
        )
        _local.ws = ws
    return ws[0][:n_workers], ws[1][:n_workers], ws[2][:n_workers]


# ----------------------------------------------------------------------------------------- public API
def _check_x(x: object, in_features: int, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype} (use x.astype(np.float32))")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (tokens, in_features), got shape {x.shape}")
    if x.shape[1] != in_features:
        raise ValueError(f"{name} has {x.shape[1]} features, the weight expects in_features = {in_features}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (row-major); use np.ascontiguousarray")
    return x


def _check_out(a: object, shape: tuple[int, int], name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (tokens, out_features), got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return a


def _output(x: np.ndarray, w: BlockSparseMatrix, residual, out) -> np.ndarray:
    """Check ``residual`` and ``out`` (tokens, out_features) against ``x``; a new output array if ``out`` is None.
    ``out`` may be ``residual`` itself (an in-place residual add) but must not overlap ``x``."""
    shape = (x.shape[0], w.out_features)
    if residual is not None:
        _check_out(residual, shape, "residual")
    if out is None:
        return empty_aligned(shape, np.float32)  # the next layer's input: its rows are packed in 32-byte pieces
    _check_out(out, shape, "out")
    if np.shares_memory(out, x):
        raise ValueError("out must not overlap x")
    if residual is not None and out is not residual and np.shares_memory(out, residual):
        raise ValueError("out may be residual itself but must not partially overlap it")
    return out


def _kernel_code(block: tuple[int, int]) -> int:
    br, bc = block
    if bc == 1 and br % 4 == 0:
        return 1
    return {(1, 1): 2, (1, 4): 3}.get(block, 0)


def _plan(w: BlockSparseMatrix, tokens: int, threads: int) -> tuple[int, int, int, int]:
    """(block rows per task, block rows per accumulator sub-chunk, input columns per panel, tasks).

    Rows are split across tasks only as far as needed to give every thread the same number of tasks
    (``threads / gcd(tiles, threads)`` chunks per tile), so a tile is packed as few times as possible; inside a
    task the rows run in sub-chunks whose accumulator (``_ACC_BYTES``) stays in L2."""
    T = TILE_TOKENS
    br, bc = w.block
    n_in = w.in_features
    nbr = w.out_features // br
    panel = n_in
    if n_in * T * 4 > _PANEL_BYTES:
        n_panels = -(-(n_in * T * 4) // _PANEL_BYTES)
        per = -(-n_in // n_panels)
        panel = -(-per // bc) * bc  # whole blocks per panel
    n_tiles = -(-tokens // T)
    n_chunks = min(nbr, threads // math.gcd(n_tiles, threads))
    chunk = -(-nbr // n_chunks)
    n_chunks = -(-nbr // chunk)
    sub = min(chunk, max(1, _ACC_BYTES // (T * 4 * br)))
    return chunk, sub, panel, n_tiles * n_chunks


_EMPTY1 = np.zeros(1, dtype=np.float32)
_EMPTY2 = np.zeros((1, 1), dtype=np.float32)
_FLAGS: dict = {}
_jit = None


def _flags(key: tuple) -> np.ndarray:
    f = _FLAGS.get(key)
    if f is None:
        f = _FLAGS[key] = np.array(key, dtype=np.int64)
    return f


def spmm(
    x: np.ndarray,
    w: BlockSparseMatrix,
    *,
    activation: str | None = None,
    residual: np.ndarray | None = None,
    out: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """``act(x @ W^T + W.bias) + residual`` for ``x`` float32 ``(tokens, in_features)`` -> ``(tokens, out)``.

    ``activation``: ``None`` or ``"gelu"`` (erf form). ``residual``: float32 ``(tokens, out_features)``, added
    after the activation; ``out`` may be the residual (in-place add) but not ``x``. ``threads``: numba threads
    for this call (default: the current setting, see :mod:`sparsify.kernels.threads`).
    """
    if not isinstance(w, BlockSparseMatrix):
        raise ValueError(f"w must be a BlockSparseMatrix, got {type(w).__name__}")
    x = _check_x(x, w.in_features)
    if activation not in _ACT:
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    M = x.shape[0]
    out = _output(x, w, residual, out)
    if M == 0:
        return out
    if threads is not None:
        from .threads import num_threads

        with num_threads(threads):
            return _run(x, w, activation, residual, out)
    return _run(x, w, activation, residual, out)


_DIRECT_WEIGHT_BYTES = 24 * 1024  # weights of one sub-chunk of block rows, reused across the slabs of a tile
_DIRECT_MAX_TILE = 64
_DIRECT_TILE_BYTES = 256 * 1024  # packed X tile (tokens x in_features x 4 B), to stay in the 512 KB L2


def _plan_direct(w: BlockSparseMatrix, tokens: int, threads: int) -> tuple[int, int, int, int]:
    """(tokens per tile, block rows per task, block rows per sub-chunk, tasks) for the (4k) x 1 direct path.

    A tile is a multiple of 16 tokens (slabs), at most 64, smaller when in_features is large so that the packed
    tile stays in L2 (K = 3072: 16 tokens x 3072 x 4 B = 192 KB). Tasks = tiles x row chunks, rows split only
    as far as needed to give every thread the same number of tasks."""
    br = w.block[0]
    n_in = w.in_features
    nbr = w.out_features // br
    tile = _DIRECT_MAX_TILE
    while tile > 16 and tile * n_in * 4 > _DIRECT_TILE_BYTES:
        tile //= 2
    tile = min(tile, -(-tokens // 16) * 16)
    n_tiles = -(-tokens // tile)
    n_chunks = min(nbr, threads // math.gcd(n_tiles, threads))
    chunk = -(-nbr // n_chunks)
    n_chunks = -(-nbr // chunk)
    row_bytes = max(1.0, w.indices.shape[0] / max(1, nbr)) * (br * 4 + 4)  # int8 weights are widened to float32
    sub = int(min(chunk, max(1, _DIRECT_WEIGHT_BYTES // row_bytes)))
    return tile, chunk, sub, n_tiles * n_chunks


_ONES: dict = {}


def _unit_vectors(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only float32 ones / zeros of length n (scales / bias of a matrix without them)."""
    v = _ONES.get(n)
    if v is None:
        ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
        ones.flags.writeable = False
        zeros.flags.writeable = False
        v = _ONES[n] = (ones, zeros)
    return v


def _direct_workspace(n_workers: int, size: int) -> np.ndarray:
    ws = getattr(_local, "xs", None)
    if ws is None or ws.shape[0] < n_workers or ws.shape[1] < size:
        old = ws.shape if ws is not None else (0, 0)
        ws = _local.xs = zeros_aligned((max(n_workers, old[0]), -(-max(size, old[1]) // 16) * 16), np.float32)
    return ws[:n_workers]


def _run(x, w, activation, residual, out):
    """The jitted call, with the per-(matrix, tokens, threads) plan cached on the matrix."""
    global _jit
    if _jit is None:
        from . import _jit as jit_module

        _jit = jit_module
    if _kernel_code(w.block) == 1:
        return _run_direct(x, w, activation, residual, out)
    return _run_acc(x, w, activation, residual, out)


_PAD = 4  # block rows padded to a multiple of this many blocks (zero weights): see _padded


def _padded(w: BlockSparseMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, data) with every block row padded to a multiple of ``_PAD`` blocks by zero-weight blocks
    on the row's last column (an X line already in L1), cached on ``w``. The micro-kernel's loop is unrolled by 4
    by LLVM; a remainder of 1-3 blocks took a separate, mispredicted loop on almost every call."""
    key = ("padded", _PAD)
    v = w._cache.get(key)
    if v is not None:
        return v
    counts = np.diff(w.indptr).astype(np.int64)
    nbr = counts.shape[0]
    pc = -(-counts // _PAD) * _PAD
    indptr = np.zeros(nbr + 1, np.int64)
    np.cumsum(pc, out=indptr[1:])
    n = int(indptr[-1])
    row_of = np.repeat(np.arange(nbr), counts)
    pos = np.arange(w.indices.shape[0]) - w.indptr[:-1].astype(np.int64)[row_of]
    slot = indptr[:-1][row_of] + pos
    last = np.where(counts > 0, w.indices[np.maximum(w.indptr[1:].astype(np.int64) - 1, 0)] if w.indices.size
                    else 0, 0)
    indices = np.repeat(last.astype(np.int32), pc)
    indices[slot] = w.indices
    data = np.zeros((n,) + w.data.shape[1:], w.data.dtype)
    data[slot] = w.data
    v = w._cache[key] = (indptr.astype(np.int32), indices, data)
    return v


_NO_WIDEN: dict = {}


def _widen_workspace(n_workers: int, size: int) -> np.ndarray:
    """Per-worker float32 buffer for int8 weights widened per sub-chunk; (n, 0) for float32 weights."""
    if size == 0:
        v = _NO_WIDEN.get(n_workers)
        if v is None:
            v = _NO_WIDEN[n_workers] = np.zeros((n_workers, 0), np.float32)
        return v
    ws = getattr(_local, "wide", None)
    if ws is None or ws.shape[0] < n_workers or ws.shape[1] < size:
        old = ws.shape if ws is not None else (0, 0)
        ws = _local.wide = zeros_aligned((max(n_workers, old[0]), -(-max(size, old[1]) // 16) * 16), np.float32)
    return ws[:n_workers]


_MAX_PLANS = 64  # per matrix; a length-adaptive runtime sees a new token count on almost every call
_NO_PLANS: dict = {}  # read-only stand-in for a matrix without plans yet


def _cached_plan(w: BlockSparseMatrix, key: tuple, build, *args):
    """The launch plan of ``w`` for ``key`` (path, tokens, threads), built by ``build(*args)`` once. Plans live in
    their own bounded table inside ``w._cache``, so evicting them never drops the padded or int8 copies of the
    weights cached beside them. A hit is two dictionary lookups (this runs on every kernel call)."""
    plan = w._cache.get("plans", _NO_PLANS).get(key)
    if plan is None:
        plans = w._cache.setdefault("plans", {})
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plan = plans[key] = build(*args)
    return plan


def _counter() -> np.ndarray:
    """This Python thread's task counter for a parallel call, reset to 0."""
    c = getattr(_local, "counter", None)
    if c is None:
        c = _local.counter = np.zeros(1, np.int64)
    c[0] = 0
    return c


def _direct_plan(w: BlockSparseMatrix, M: int, n_threads: int) -> tuple:
    """Everything a direct-path call of ``w`` on M tokens with n_threads needs besides x, out and the per-thread
    workspaces: the jitted entry, the padded weights, scales / bias (ones / zeros if none), the task split and the
    workspace sizes."""
    tile, chunk, sub, n_tasks = _plan_direct(w, M, n_threads)
    n_workers = min(n_threads, n_tasks)
    ones, zeros = _unit_vectors(w.out_features)
    indptr, indices, data = _padded(w) if _PAD > 1 else (w.indptr, w.indices, w.data)
    wide = 0  # int8 weights: float32 buffer for the largest sub-chunk of (padded) blocks
    if w.data.dtype == np.int8:
        nbr = len(indptr) - 1
        for b0 in range(0, nbr, chunk):
            b1 = min(nbr, b0 + chunk)
            for s0 in range(b0, b1, sub):
                wide = max(wide, int(indptr[min(b1, s0 + sub)]) - int(indptr[s0]))
        wide *= w.block[0] * w.block[1]
    fn = _jit.spmm_direct if n_workers > 1 else _jit.spmm_direct_serial
    return (fn, indptr, indices, data, w.scales if w.scales is not None else ones,
            w.bias if w.bias is not None else zeros, tile, chunk, sub, n_tasks, n_workers, tile * w.in_features, wide)


def _run_direct(x, w, activation, residual, out):
    """The (4k) x 1 path: one plan lookup, the per-thread workspaces, the jitted call (the Python part of a call
    is 3-6 us, a tenth of a 384 x 384 product over 128 tokens on 2 threads)."""
    M = x.shape[0]
    n_threads = get_num_threads()
    plan = _cached_plan(w, ("direct", M, n_threads), _direct_plan, w, M, n_threads)
    fn, indptr, indices, data, scales, bias, tile, chunk, sub, n_tasks, n_workers, xs_size, wide = plan
    fn(x, indptr, indices, data, scales, bias, residual if residual is not None else _EMPTY2, out,
       _ACT[activation] | (0 if residual is None else 2), tile, chunk, sub, n_tasks,
       _direct_workspace(n_workers, xs_size), _counter(), _widen_workspace(n_workers, wide))
    return out


def _run_acc(x, w, activation, residual, out):
    """The accumulator path (other block shapes)."""
    global _jit
    if _jit is None:
        from . import _jit as jit_module

        _jit = jit_module
    M = x.shape[0]
    n_threads = get_num_threads()

    def build():
        chunk, sub, panel, n_tasks = _plan(w, M, n_threads)
        code = _kernel_code(w.block)  # (4k) x 1 normally takes the direct path; here the generic loop
        return chunk, sub, panel, n_tasks, min(n_threads, n_tasks), 0 if code == 1 else code

    chunk, sub, panel, n_tasks, n_workers, code = _cached_plan(w, ("acc", M, n_threads), build)
    br = w.block[0]
    xt_ws, acc_ws, cur_ws = _workspace(n_workers, min(panel, w.in_features), sub * br, sub)
    flags = _flags((w.scales is not None, w.bias is not None, _ACT[activation], residual is not None))
    fn = _jit.spmm_f32act if n_workers > 1 else _jit.spmm_f32act_serial
    fn(
        x,
        w.indptr,
        w.indices,
        w.data,
        code,
        w.scales if w.scales is not None else _EMPTY1,
        w.bias if w.bias is not None else _EMPTY1,
        residual if residual is not None else _EMPTY2,
        out,
        flags,
        chunk,
        sub,
        panel,
        n_tasks,
        xt_ws,
        acc_ws,
        cur_ws,
    )
    return out


def linear(x: np.ndarray, w: BlockSparseMatrix, **kwargs) -> np.ndarray:
    """Alias of :func:`spmm` with the ``torch.nn.functional.linear`` argument order."""
    return spmm(x, w, **kwargs)
