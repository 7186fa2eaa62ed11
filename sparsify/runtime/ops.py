"""Fused element-wise and attention ops of the CPU runtime (numpy / numba only, never torch).

Hidden states are *packed*: the real tokens of every sequence of a batch are concatenated row after row, so a
``(tokens, hidden)`` float32 array holds no padding, and ``starts`` / ``lens`` (int64) give each sequence's rows.
The Linear layers go through :func:`sparsify.kernels.spmm` on that packed array; the ops here do the rest:
embeddings + layer norm, layer norm, multi-head softmax attention per sequence (with the attention each token
receives, summed over heads and queries, for length-adaptive token dropping) and activation fake quantization.

Like the kernels: private ``@njit`` functions over raw arrays behind public functions that check shapes and
dtypes, compiled lazily on first call and cached on disk (``cache=True``), never at import.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["embed_layernorm", "layernorm_", "attention", "fake_quant", "check_packed"]

_OPTS = dict(cache=True, fastmath=True, nogil=True, boundscheck=False, error_model="numpy")


# ----------------------------------------------------------------------------------------- jitted
@njit(**_OPTS)
def _ln_rows(x, lo, hi, gamma, beta, eps, out):
    """Layer norm of rows [lo, hi) of ``x`` into ``out`` (may be ``x``)."""
    n = x.shape[1]
    for t in range(lo, hi):
        mean = np.float32(0.0)
        for k in range(n):
            mean += x[t, k]
        mean /= n
        var = np.float32(0.0)
        for k in range(n):
            d = x[t, k] - mean
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / n + eps)
        for k in range(n):
            out[t, k] = (x[t, k] - mean) * inv * gamma[k] + beta[k]


# numba parfor bodies are not inlined or vectorized well: each parallel loop below runs over a few chunks and
# calls a serial function that does the work.
@njit(parallel=True, **_OPTS)
def _layernorm_inplace(x, gamma, beta, eps, n_chunks):
    T = x.shape[0]
    for c in prange(n_chunks):
        _ln_rows(x, c * T // n_chunks, (c + 1) * T // n_chunks, gamma, beta, eps, x)


@njit(**_OPTS)
def _embed_rows(ids, pos, types, word, posemb, typeemb, gamma, beta, eps, out, lo, hi):
    H = out.shape[1]
    for t in range(lo, hi):
        i, p, ty = ids[t], pos[t], types[t]
        for k in range(H):
            out[t, k] = word[i, k] + typeemb[ty, k] + posemb[p, k]
    _ln_rows(out, lo, hi, gamma, beta, eps, out)


@njit(parallel=True, **_OPTS)
def _embed_ln(ids, pos, types, word, posemb, typeemb, gamma, beta, eps, out, n_chunks):
    T = out.shape[0]
    for c in prange(n_chunks):
        _embed_rows(ids, pos, types, word, posemb, typeemb, gamma, beta, eps, out, c * T // n_chunks,
                    (c + 1) * T // n_chunks)


@njit(**_OPTS)
def _softmax_row(row, n, ebits):
    """In place over ``row[:n]``: a vectorizable exp (2^n * Taylor polynomial, |rel err| < 2e-7)."""
    m = row[0]
    for j in range(1, n):
        m = max(m, row[j])
    log2e = np.float32(1.4426950408889634)
    ln2 = np.float32(0.6931471805599453)
    for j in range(n):
        x = max(row[j] - m, np.float32(-87.0))
        t = x * log2e
        k = np.floor(t + np.float32(0.5))
        y = (t - k) * ln2
        p = np.float32(1.0) + y * (np.float32(1.0) + y * (np.float32(0.5) + y * (
            np.float32(1.0 / 6.0) + y * (np.float32(1.0 / 24.0) + y * (
                np.float32(1.0 / 120.0) + y * np.float32(1.0 / 720.0))))))
        row[j] = p
        ebits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
    scale = ebits.view(np.float32)
    s = np.float32(0.0)
    for j in range(n):
        v = row[j] * scale[j]
        row[j] = v
        s += v
    inv = np.float32(1.0) / s
    for j in range(n):
        row[j] *= inv


@njit(**_OPTS)
def _attention_task(task, qkv, starts, lens, n_heads, d, scale, ctx, sig, want_sig, first_only):
    H = n_heads * d
    s = task // n_heads
    h = task - s * n_heads
    st = starts[s]
    L = lens[s]
    if L == 0:
        return
    kt = np.empty((d, L), np.float32)  # K^T: the score row is a contiguous loop over keys
    v = np.empty((L, d), np.float32)
    for j in range(L):
        src = qkv[st + j]
        for k in range(d):
            kt[k, j] = src[H + h * d + k]
            v[j, k] = src[2 * H + h * d + k]
    row = np.empty(L, np.float32)
    ebits = np.empty(L, np.int32)
    acc = np.empty(d, np.float32)
    received = np.zeros(L, np.float32)
    n_q = 1 if first_only else L
    for i in range(n_q):
        q = qkv[st + i]
        for j in range(L):
            row[j] = 0.0
        for k in range(d):
            qk = q[h * d + k] * scale
            ktk = kt[k]
            for j in range(L):
                row[j] += qk * ktk[j]
        _softmax_row(row, L, ebits)
        if want_sig:
            for j in range(L):
                received[j] += row[j]
        for k in range(d):
            acc[k] = 0.0
        for j in range(L):
            p = row[j]
            vj = v[j]
            for k in range(d):
                acc[k] += p * vj[k]
        out = ctx[s] if first_only else ctx[st + i]
        for k in range(d):
            out[h * d + k] = acc[k]
    if want_sig:
        for j in range(L):
            sig[h, st + j] = received[j]


@njit(parallel=True, **_OPTS)
def _attention(qkv, starts, lens, n_heads, d, scale, ctx, sig, want_sig, first_only):
    n_tasks = starts.shape[0] * n_heads
    for task in prange(n_tasks):
        _attention_task(task, qkv, starts, lens, n_heads, d, scale, ctx, sig, want_sig, first_only)


@njit(**_OPTS)
def _fake_quant_rows(x, inv_scale, scale, zero_point, qmin, qmax, out, lo, hi):
    n = x.shape[1]
    for t in range(lo, hi):
        for k in range(n):
            q = np.rint(x[t, k] * inv_scale[k]) + zero_point[k]
            q = min(max(q, qmin), qmax)
            out[t, k] = (q - zero_point[k]) * scale[k]


@njit(parallel=True, **_OPTS)
def _fake_quant(x, inv_scale, scale, zero_point, qmin, qmax, out, n_chunks):
    T = x.shape[0]
    for c in prange(n_chunks):
        _fake_quant_rows(x, inv_scale, scale, zero_point, qmin, qmax, out, c * T // n_chunks, (c + 1) * T // n_chunks)


# ----------------------------------------------------------------------------------------- checks
def _f32_2d(name: str, a, cols: int | None = None) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2 or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous float32 2-D array, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if cols is not None and a.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {a.shape}")
    return a


def _f32_1d(name: str, a, n: int) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != (n,) or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous float32 array of shape ({n},), got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    return a


def check_packed(starts: np.ndarray, lens: np.ndarray, tokens: int) -> None:
    """``starts`` / ``lens`` int64 describe consecutive, non-overlapping sequences covering ``tokens`` rows."""
    for name, a in (("starts", starts), ("lens", lens)):
        if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.ndim != 1 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous int64 1-D array")
    if starts.shape != lens.shape:
        raise ValueError("starts and lens must have the same length")
    if lens.size and (lens.min() < 1 or starts[0] != 0 or np.any(starts[1:] != np.cumsum(lens)[:-1])
                      or starts[-1] + lens[-1] != tokens):
        raise ValueError("starts / lens do not describe consecutive non-empty sequences over the packed rows")


# ----------------------------------------------------------------------------------------- public API
def _chunks(rows: int) -> int:
    """Row chunks for the parallel loops: a few per thread (measured faster than one), none under 16 rows."""
    import numba

    return max(1, min(4 * numba.get_num_threads(), rows // 16))


def layernorm_(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """Layer norm over the last axis of a float32 ``(tokens, hidden)`` array, in place; returns ``x``."""
    x = _f32_2d("x", x)
    _f32_1d("gamma", gamma, x.shape[1])
    _f32_1d("beta", beta, x.shape[1])
    if x.shape[0]:
        _layernorm_inplace(x, gamma, beta, np.float32(eps), _chunks(x.shape[0]))
    return x


def embed_layernorm(ids, positions, token_types, word, pos, typ, gamma, beta, eps: float) -> np.ndarray:
    """``LN(word[ids] + type[token_types] + pos[positions])`` for packed tokens -> float32 ``(tokens, hidden)``."""
    H = word.shape[1]
    for name, a in (("word embeddings", word), ("position embeddings", pos), ("token type embeddings", typ)):
        _f32_2d(name, a, H)
    _f32_1d("gamma", gamma, H)
    _f32_1d("beta", beta, H)
    n = ids.shape[0]
    for name, a, limit in (("input_ids", ids, word.shape[0]), ("position ids", positions, pos.shape[0]),
                           ("token_type_ids", token_types, typ.shape[0])):
        if a.dtype != np.int64 or a.shape != (n,):
            raise ValueError(f"{name} must be int64 of shape ({n},)")
        if n and (a.min() < 0 or a.max() >= limit):
            raise ValueError(f"{name} out of range [0, {limit}): min {a.min()}, max {a.max()}")
    out = np.empty((n, H), np.float32)
    if n:
        _embed_ln(ids, positions, token_types, word, pos, typ, gamma, beta, np.float32(eps), out, _chunks(n))
    return out


def attention(qkv: np.ndarray, starts: np.ndarray, lens: np.ndarray, n_heads: int, *,
              significance: bool = False, first_query_only: bool = False):
    """Multi-head softmax attention of packed sequences.

    ``qkv``: float32 ``(tokens, 3 * hidden)``, the query, key and value projections side by side (each
    ``(heads, head_dim)`` head-major, as BERT splits them). Every sequence attends only to itself (packing
    replaces the padding mask). Returns ``(context (tokens, hidden), significance (tokens,) or None)``, where
    significance is the attention each token receives, summed over heads and queries. With
    ``first_query_only`` only the first token ([CLS]) of each sequence attends: context is ``(sequences, hidden)``.
    """
    qkv = _f32_2d("qkv", qkv)
    if qkv.shape[1] % (3 * n_heads):
        raise ValueError(f"qkv width {qkv.shape[1]} is not 3 x heads ({n_heads}) x head_dim")
    check_packed(starts, lens, qkv.shape[0])
    H = qkv.shape[1] // 3
    d = H // n_heads
    T = qkv.shape[0]
    ctx = np.empty((starts.shape[0] if first_query_only else T, H), np.float32)
    sig = np.zeros((n_heads, T) if significance else (1, 1), np.float32)
    if T:
        _attention(qkv, starts, lens, n_heads, d, np.float32(1.0 / np.sqrt(d)), ctx, sig, significance,
                   first_query_only)
    return ctx, (sig.sum(axis=0) if significance else None)


def fake_quant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int = 8,
               signed: bool = False) -> np.ndarray:
    """Quantize-dequantize activations per feature: ``(clamp(round(x / s) + zp) - zp) * s``.

    Per-tensor and per-group (PEG) parameters are expanded to one ``scale`` / ``zero_point`` per feature by the
    caller. Returns a new array.
    """
    x = _f32_2d("x", x)
    n = x.shape[1]
    _f32_1d("scale", scale, n)
    _f32_1d("zero_point", zero_point, n)
    if not np.all(scale > 0):
        raise ValueError("activation scales must be positive")
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    out = np.empty_like(x)
    if x.shape[0]:
        _fake_quant(x, (1.0 / scale).astype(np.float32), scale, zero_point, np.float32(qmin), np.float32(qmax), out,
                    _chunks(x.shape[0]))
    return out
