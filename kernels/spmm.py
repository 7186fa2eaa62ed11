"""Block-sparse x dense products for Linear layers: ``Y = act(X @ W^T + bias) + residual``.

``X`` is ``(tokens, in_features)`` float32 row-major, ``W`` a :class:`~sparsify.kernels.format.BlockSparseMatrix`
(float32, or int8 with per-output-channel scales: int8 weights with float32 activations).

Design (see ``docs/kernels.md``): parallel over tasks = (tile of 64 tokens) x (chunk of block rows). A task
packs its X tile transposed into a local ``(K_panel, 64)`` buffer, then for each block row keeps a
``(rows, 64)`` accumulator in L1 and walks the non-zero blocks several at a time with a contiguous inner loop of
64 tokens (a constant trip count, which LLVM turns into 256-bit FMAs). Large ``in_features`` are cut into
panels so the packed tile stays in L2. Bias, scales, GELU (erf form) and the residual add are fused into the
write-out.

The jitted functions are private, compiled lazily on first call and cached on disk; the public functions check
every shape, dtype and contiguity first and raise ``ValueError``.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .format import BlockSparseMatrix

__all__ = ["spmm", "linear", "reference_spmm", "gelu_reference", "TILE_TOKENS"]

TILE_TOKENS = 64  # tokens per task (constant inner trip count)
_PANEL_BYTES = 256 * 1024  # packed X tile per panel: half of the 512 KB L2 of these cores
_ACC_BYTES = 128 * 1024  # accumulator of one task's chunk of output rows

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
            np.zeros((max(n_workers, old[0].shape[0]), max(panel, old[0].shape[1]), T), np.float32),
            np.zeros((max(n_workers, old[1].shape[0]), max(chunk_rows, old[1].shape[1]), T), np.float32),
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
        return np.empty(shape, dtype=np.float32)
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


def _run(x, w, activation, residual, out):
    """The jitted call, with the per-(matrix, tokens, threads) plan cached on the matrix."""
    global _jit
    if _jit is None:
        from . import _jit as jit_module

        _jit = jit_module
    import numba

    M = x.shape[0]
    n_threads = numba.get_num_threads()
    key = ("plan", M, n_threads)
    plan = w._cache.get(key)
    if plan is None:
        if len(w._cache) > 64:
            w._cache.clear()
        chunk, sub, panel, n_tasks = _plan(w, M, n_threads)
        plan = w._cache[key] = (chunk, sub, panel, n_tasks, min(n_threads, n_tasks), _kernel_code(w.block))
    chunk, sub, panel, n_tasks, n_workers, code = plan
    br = w.block[0]
    xt_ws, acc_ws, cur_ws = _workspace(n_workers, min(panel, w.in_features), sub * br, sub)
    flags = _flags((w.scales is not None, w.bias is not None, _ACT[activation], residual is not None))
    _jit.spmm_f32act(
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
