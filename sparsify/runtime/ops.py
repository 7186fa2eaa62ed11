"""Fused element-wise ops of the CPU runtime (numpy / numba only, never torch).

Hidden states are *packed*: the real tokens of every sequence of a batch are concatenated row after row, so a
``(tokens, hidden)`` float32 array holds no padding, and ``starts`` / ``lens`` (int64) give each sequence's rows.
The Linear layers go through :func:`sparsify.kernels.spmm` on that packed array, attention through
:mod:`sparsify.runtime.attention`; the ops here do the rest: embeddings (float32 or int8 rows with scales) + layer
norm, layer norm fused with the fake quantization around it (the residual sum before, the output after, and a
quantized copy for the next Linear), the softmax row used by the attention, and activation fake quantization.

Like the kernels: private ``@njit`` functions over raw arrays behind public functions that check shapes and
dtypes, compiled lazily on first call and cached on disk (``cache=True``), never at import.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..kernels.spmm import empty_aligned
from ..kernels.threads import get_num_threads

__all__ = ["embed_layernorm", "decode_rows", "layernorm_", "layernorm_quant_", "fake_quant", "linear64",
           "check_packed"]

_OPTS = dict(cache=True, fastmath=True, nogil=True, boundscheck=False, error_model="numpy")


# ----------------------------------------------------------------------------------------- jitted
@njit(**_OPTS)
def _ln_rows(x, lo, hi, gamma, beta, eps):
    """Layer norm of rows [lo, hi) of ``x``, in place.

    In-place loops take one array on purpose (here and in :func:`_fq_row_`): given a separate ``out`` that is
    the same array, LLVM's vectorized loop fails its run-time overlap check and the scalar loop runs instead
    (measured 3x slower for the fake quantization of 128 x 1536 values)."""
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
            x[t, k] = (x[t, k] - mean) * inv * gamma[k] + beta[k]


# numba parfor bodies are not inlined or vectorized well: each parallel loop below runs over a few chunks and
# calls a serial function that does the work.
@njit(parallel=True, **_OPTS)
def _layernorm_inplace(x, gamma, beta, eps, n_chunks):
    T = x.shape[0]
    for c in prange(n_chunks):
        _ln_rows(x, c * T // n_chunks, (c + 1) * T // n_chunks, gamma, beta, eps)


@njit(**_OPTS)
def _embed_rows(ids, pos, types, word, wscale, posemb, typeemb, gamma, beta, eps, out, lo, hi):
    """``word`` float32, or int8 with one scale per row (``wscale``; ones for float32): the row is dequantized
    as ``float32(code) * scale``, then ``+ type + position`` in the order transformers adds them."""
    H = out.shape[1]
    for t in range(lo, hi):
        i, p, ty = ids[t], pos[t], types[t]
        s = wscale[i]
        for k in range(H):
            out[t, k] = (np.float32(word[i, k]) * s + typeemb[ty, k]) + posemb[p, k]
    _ln_rows(out, lo, hi, gamma, beta, eps)


# no fastmath: ``code * scale + offset`` must round twice (a multiply, then an add) as PyTorch does, not fuse
@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _decode_rows(ids, packed, bits, scales, offsets, out):
    """Rows ``ids`` of a packed 4-bit (two codes per byte, low nibble first, code + 8) or 2-bit (four codes per
    byte, lowest bits first) table into float32 ``out``: ``code * scale`` (4 bits), ``code * scale + offset``
    (2 bits)."""
    H = out.shape[1]
    for t in range(ids.shape[0]):
        i = ids[t]
        s = scales[i]
        if bits == 4:
            for k in range(H):
                b = np.int32(packed[i, k >> 1])
                c = (b >> 4) if (k & 1) else (b & 15)
                out[t, k] = np.float32(c - 8) * s
        else:
            o = offsets[i]
            for k in range(H):
                c = (np.int32(packed[i, k >> 2]) >> (2 * (k & 3))) & 3
                out[t, k] = np.float32(c) * s + o


@njit(parallel=True, **_OPTS)
def _embed_ln(ids, pos, types, word, wscale, posemb, typeemb, gamma, beta, eps, out, n_chunks):
    T = out.shape[0]
    for c in prange(n_chunks):
        _embed_rows(ids, pos, types, word, wscale, posemb, typeemb, gamma, beta, eps, out, c * T // n_chunks,
                    (c + 1) * T // n_chunks)


@intrinsic
def _bits_to_f32(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (a register bitcast, vectorizable)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", **_OPTS)
def _exp_nonpositive(x):
    """``exp(x)`` for float32 ``x <= 0`` (below -87 it flushes to about 1.6e-38): ``2**k`` set through the
    float's bits times a degree-6 Taylor polynomial on ``|y| <= ln(2) / 2``, |rel err| < 2e-7; vectorizes."""
    t = max(x, np.float32(-87.0)) * np.float32(1.4426950408889634)
    k = np.floor(t + np.float32(0.5))
    y = (t - k) * np.float32(0.6931471805599453)
    p = np.float32(1.0) + y * (np.float32(1.0) + y * (np.float32(0.5) + y * (
        np.float32(1.0 / 6.0) + y * (np.float32(1.0 / 24.0) + y * (
            np.float32(1.0 / 120.0) + y * np.float32(1.0 / 720.0))))))
    return p * _bits_to_f32(np.int32((k + np.float32(127.0)) * np.float32(8388608.0)))


@njit(**_OPTS)
def _softmax_row(row, n):
    """Softmax in place over ``row[:n]``."""
    m = row[0]
    for j in range(1, n):
        m = max(m, row[j])
    s = np.float32(0.0)
    for j in range(n):
        v = _exp_nonpositive(row[j] - m)
        row[j] = v
        s += v
    inv = np.float32(1.0) / s
    for j in range(n):
        row[j] *= inv


# Fake quantization must round exactly as PyTorch does (``torch.round(x / scale)``: a true division, half to
# even), so it is compiled without fastmath (which would turn the division into a reciprocal multiply); the flags
# are per instruction, so they survive inlining into the fastmath kernels that call these.
_EXACT = dict(cache=True, fastmath=False, nogil=True, boundscheck=False, error_model="numpy")


@njit(**_EXACT)
def _fq_value(x, scale, zero_point, qmin, qmax):
    """One fake-quantized value: ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``."""
    q = np.rint(x / scale) + zero_point
    q = min(max(q, qmin), qmax)
    return (q - zero_point) * scale


@njit(**_EXACT)
def _fq_row(x, t, scale, zero_point, qmin, qmax, out):
    """Row ``t`` of ``x`` fake-quantized (per-feature scale and zero point) into row ``t`` of ``out`` (another
    array: :func:`_fq_row_` works in place)."""
    for k in range(x.shape[1]):
        out[t, k] = _fq_value(x[t, k], scale[k], zero_point[k], qmin, qmax)


@njit(**_EXACT)
def _fq_row_(x, t, scale, zero_point, qmin, qmax):
    """Row ``t`` of ``x`` fake-quantized in place (see :func:`_ln_rows` for why a separate function)."""
    for k in range(x.shape[1]):
        x[t, k] = _fq_value(x[t, k], scale[k], zero_point[k], qmin, qmax)


@njit(parallel=True, **_EXACT)
def _fake_quant(x, scale, zero_point, qmin, qmax, out, inplace, n_chunks):
    T = x.shape[0]
    for c in prange(n_chunks):
        for t in range(c * T // n_chunks, (c + 1) * T // n_chunks):
            if inplace:
                _fq_row_(x, t, scale, zero_point, qmin, qmax)
            else:
                _fq_row(x, t, scale, zero_point, qmin, qmax, out)


@njit(**_OPTS)
def _ln_quant_rows(x, gamma, beta, eps, q_in, s_in, z_in, lo_in, hi_in, q_out, s_out, z_out, lo_out, hi_out, q_next,
                   s_next, z_next, lo_next, hi_next, nxt, lo, hi):
    """Rows [lo, hi) of ``x``: fake-quantize (``q_in``: the residual sum), layer norm, fake-quantize
    (``q_out``: the LayerNorm output), all in place, and write ``nxt`` = the result fake-quantized for the next
    Linear (``q_next``); ``lo_*`` / ``hi_*``: the code range."""
    for t in range(lo, hi):
        if q_in:
            _fq_row_(x, t, s_in, z_in, lo_in, hi_in)
        _ln_rows(x, t, t + 1, gamma, beta, eps)
        if q_out:
            _fq_row_(x, t, s_out, z_out, lo_out, hi_out)
        if q_next:
            _fq_row(x, t, s_next, z_next, lo_next, hi_next, nxt)


@njit(parallel=True, **_OPTS)
def _ln_quant(x, gamma, beta, eps, q_in, s_in, z_in, lo_in, hi_in, q_out, s_out, z_out, lo_out, hi_out, q_next, s_next,
              z_next, lo_next, hi_next, nxt, n_chunks):
    T = x.shape[0]
    for c in prange(n_chunks):
        _ln_quant_rows(x, gamma, beta, eps, q_in, s_in, z_in, lo_in, hi_in, q_out, s_out, z_out, lo_out, hi_out,
                       q_next, s_next, z_next, lo_next, hi_next, nxt, c * T // n_chunks, (c + 1) * T // n_chunks)


@njit(**_OPTS)
def _linear64_rows(x, w, b, tanh, out, lo, hi):
    """Rows [lo, hi) of ``out = x @ w.T + b`` (optionally tanh), accumulated in float64."""
    for t in range(lo, hi):
        for o in range(w.shape[0]):
            acc = 0.0
            for k in range(w.shape[1]):
                acc += np.float64(x[t, k]) * np.float64(w[o, k])
            acc += b[o]
            out[t, o] = np.tanh(acc) if tanh else acc


@njit(parallel=True, **_OPTS)
def _linear64(x, w, b, tanh, out, n_chunks):
    T = x.shape[0]
    for c in prange(n_chunks):
        _linear64_rows(x, w, b, tanh, out, c * T // n_chunks, (c + 1) * T // n_chunks)


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
_SERIAL_ELEMENTS = 1 << 18


def _chunks(rows: int, cols: int) -> int:
    """Row chunks for the parallel loops: a few per thread (measured faster than one); one (no second thread
    woken) under 2**18 values, where waking the pool cost more than it saved (2 threads, 128 tokens: layer norm
    with its quantization 85 us in 8 chunks against 58 us in one, fake quantization of 128 x 1536 52 against 43)."""
    if rows * cols < _SERIAL_ELEMENTS:
        return 1
    return max(1, min(4 * get_num_threads(), rows // 16))


def layernorm_(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """Layer norm over the last axis of a float32 ``(tokens, hidden)`` array, in place; returns ``x``."""
    x = _f32_2d("x", x)
    _f32_1d("gamma", gamma, x.shape[1])
    _f32_1d("beta", beta, x.shape[1])
    if x.shape[0]:
        _layernorm_inplace(x, gamma, beta, np.float32(eps), _chunks(*x.shape))
    return x


def _quant_args(name: str, q, n: int):
    """(on, scale, zero point, qmin, qmax) kernel arguments of ``q`` = (scale, zero point, bits, signed) per
    feature, or None."""
    if q is None:
        return False, _ones(1), _ones(1), np.float32(0), np.float32(0)
    scale, zero_point, bits, signed = q
    _f32_1d(f"{name} scale", scale, n)
    _f32_1d(f"{name} zero point", zero_point, n)
    if not np.all(scale > 0):
        raise ValueError("activation scales must be positive")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    return True, scale, zero_point, np.float32(lo), np.float32(hi)


def layernorm_quant_(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, q_in=None, q_out=None,
                     q_next=None) -> tuple[np.ndarray, np.ndarray]:
    """In one pass over a float32 ``(tokens, hidden)`` array: fake-quantize it (``q_in``), layer norm, fake-quantize
    the result (``q_out``), in place; and a fake-quantized copy of the result for the next Linear (``q_next``).
    Each ``q`` is ``(scale, zero_point, bits, signed)`` per feature (as :func:`fake_quant`) or None. Returns
    ``(x, copy)``, the copy being ``x`` itself without ``q_next``."""
    x = _f32_2d("x", x)
    n = x.shape[1]
    _f32_1d("gamma", gamma, n)
    _f32_1d("beta", beta, n)
    args_in, args_out, args_next = (_quant_args(nm, q, n) for nm, q in (("input", q_in), ("output", q_out),
                                                                         ("next", q_next)))
    nxt = empty_aligned(x.shape, np.float32) if q_next is not None else x
    if x.shape[0]:
        _ln_quant(x, gamma, beta, np.float32(eps), *args_in, *args_out, *args_next, nxt, _chunks(*x.shape))
    return x, nxt


def embed_layernorm(ids, positions, token_types, word, pos, typ, gamma, beta, eps: float, *,
                    word_scales: np.ndarray | None = None) -> np.ndarray:
    """``LN(word[ids] + type[token_types] + pos[positions])`` for packed tokens -> float32 ``(tokens, hidden)``.

    ``word`` is float32, or int8 codes with ``word_scales`` (float32, one per row): row ``i`` is
    ``word[i] * word_scales[i]``."""
    H = word.shape[1]
    if word_scales is None:
        _f32_2d("word embeddings", word)
        word_scales = _ones(word.shape[0])
    else:
        if not isinstance(word, np.ndarray) or word.dtype != np.int8 or word.ndim != 2 or not word.flags.c_contiguous:
            raise ValueError("word embeddings with scales must be a C-contiguous int8 2-D array")
        _f32_1d("word_scales", word_scales, word.shape[0])
    for name, a in (("position embeddings", pos), ("token type embeddings", typ)):
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
    out = empty_aligned((n, H), np.float32)
    if n:
        _embed_ln(ids, positions, token_types, word, word_scales, pos, typ, gamma, beta, np.float32(eps), out,
                  _chunks(n, H))
    return out


def decode_rows(ids, packed: np.ndarray, bits: int, scales: np.ndarray, offsets: np.ndarray | None,
                width: int) -> np.ndarray:
    """float32 ``(len(ids), width)``: the rows ``ids`` of a packed low-bit table (see
    :mod:`sparsify.packing`), decoded as ``code * scale`` (4 bits, signed codes) or ``code * scale + offset``
    (2 bits, codes 0..3), one scale (and offset) per row."""
    if bits not in (4, 2):
        raise ValueError(f"decode_rows: bits must be 4 or 2, got {bits}")
    per = 8 // bits
    if (not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 2
            or packed.shape[1] != -(-width // per) or not packed.flags.c_contiguous):
        raise ValueError(f"decode_rows: packed rows must be C-contiguous uint8 of shape (rows, {-(-width // per)})")
    rows = packed.shape[0]
    _f32_1d("scales", scales, rows)
    if bits == 2:
        _f32_1d("offsets", offsets, rows)
    else:
        offsets = _ones(1)
    ids = np.ascontiguousarray(ids, np.int64)
    if ids.ndim != 1:
        raise ValueError("decode_rows: ids must be 1-D")
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise ValueError(f"decode_rows: ids out of range [0, {rows})")
    out = empty_aligned((ids.shape[0], width), np.float32)
    if ids.size:
        _decode_rows(ids, packed, np.int64(bits), scales, offsets, out)
    return out


def fake_quant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int = 8,
               signed: bool = False, *, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize-dequantize activations per feature: ``(clamp(round(x / s) + zp) - zp) * s``, rounding half to
    even as ``torch.round``.

    Per-tensor and per-group (PEG) parameters are expanded to one ``scale`` / ``zero_point`` per feature by the
    caller. Returns a new array, or ``out`` (same shape as ``x``; may be ``x``).
    """
    x = _f32_2d("x", x)
    n = x.shape[1]
    _f32_1d("scale", scale, n)
    _f32_1d("zero_point", zero_point, n)
    if not np.all(scale > 0):
        raise ValueError("activation scales must be positive")
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if out is None:
        out = empty_aligned(x.shape, np.float32)
    else:
        _f32_2d("out", out, n)
        if out.shape != x.shape:
            raise ValueError(f"out must have the shape of x {x.shape}, got {out.shape}")
    if x.shape[0]:
        _fake_quant(x, scale, zero_point, np.float32(qmin), np.float32(qmax), out, out is x, _chunks(*x.shape))
    return out


def linear64(x: np.ndarray, w: np.ndarray, b: np.ndarray, *, tanh: bool = False) -> np.ndarray:
    """``x @ w.T + b`` (then ``tanh`` if asked) accumulated in float64, for the pooler and classifier head.

    A numba loop rather than numpy's ``@``: numpy's BLAS starts its own threads for a product this size, and they
    keep spinning after it returns, taking a core from the kernels of the next forward pass (measured: the
    attention of the following batch's first layer ran about 1.5x slower). ``x`` float32 or float64 ``(n, in)``,
    ``w`` float32 ``(out, in)``, ``b`` ``(out,)``; returns float64 ``(n, out)``."""
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w)
    b = np.ascontiguousarray(b, dtype=np.float64)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or b.shape != (w.shape[0],):
        raise ValueError(f"linear64: x {x.shape}, w {w.shape} and b {b.shape} do not fit x @ w.T + b")
    out = np.empty((x.shape[0], w.shape[0]), np.float64)
    if x.shape[0]:
        _linear64(x, w, b, bool(tanh), out, max(1, min(get_num_threads(), x.shape[0])))
    return out


_ONES: dict[int, np.ndarray] = {}


def _ones(n: int) -> np.ndarray:
    a = _ONES.get(n)
    if a is None:
        a = _ONES[n] = np.ones(n, np.float32)
    return a
