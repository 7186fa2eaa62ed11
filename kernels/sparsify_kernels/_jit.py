"""Private jitted kernels over raw numpy arrays (imported lazily by :mod:`sparsify.kernels.spmm`).

Nothing is compiled at import: ``@njit`` only builds dispatchers; each function compiles on its first call and
is cached on disk (``cache=True``). Callers validate every argument first; these functions trust their input.
"""

from __future__ import annotations

import numpy as np
from numba import config as _numba_config
from numba import njit, prange

T = 64  # tokens per tile: the constant trip count of every inner loop
_OPTS = dict(cache=True, fastmath=True, nogil=True, boundscheck=False, error_model="numpy")


@njit(inline="always", **_OPTS)
def erf32(a):
    """erf for float32: Eigen's rational approximation on [-4, 4] (|error| < 2e-7), clamped outside.
    Pure arithmetic, so a loop over it vectorizes (a libm call would not)."""
    x = min(max(a, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = np.float32(-2.72614225801306e-10)
    p = p * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = np.float32(-1.45660718464996e-05)
    q = q * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    return x * p / q


@njit(**_OPTS)
def gelu_vec(v):
    """In place: ``v = 0.5 v (1 + erf(v / sqrt 2))`` (BERT's erf GELU)."""
    for i in range(v.shape[0]):
        a = v[i]
        v[i] = np.float32(0.5) * a * (np.float32(1.0) + erf32(a * np.float32(0.7071067811865476)))


# ------------------------------------------------------------------------------------------ block rows
# Each accumulates the blocks [p, p1) of one block row whose block column is < cend into acc[a0:a0+rows, :]
# and returns where it stopped (the next panel starts there). xt is the packed, transposed X tile for input
# columns [k0, k0 + xt.shape[0]).


@njit(**_OPTS)
def rows_generic(xt, k0, indices, data, p, p1, cend, acc, a0):
    """Any block shape, one block at a time."""
    br = data.shape[1]
    bc = data.shape[2]
    while p < p1 and indices[p] < cend:
        c0 = indices[p] * bc - k0
        for r in range(br):
            a = acc[a0 + r]
            for j in range(bc):
                w = np.float32(data[p, r, j])
                xr = xt[c0 + j]
                for t in range(T):
                    a[t] += w * xr[t]
        p += 1
    return p


# ------------------------------------------------------------------------------------------ register micro-kernels
# numba has no vector types, and LLVM keeps a loop's accumulator array in memory; these intrinsics emit the
# inner loop as LLVM IR directly so the accumulators stay in ymm registers for a whole pass over a block row.
from llvmlite import ir as _ir  # noqa: E402
from numba.core import cgutils as _cgutils  # noqa: E402
from numba.core import types as _types  # noqa: E402
from numba.extending import intrinsic as _intrinsic  # noqa: E402

PREFETCH = 0  # software prefetch distance in blocks (0: off; 6 measured slower on Zen 3)
_I64 = _ir.IntType(64)
_F32 = _ir.FloatType()
_V8F = _ir.VectorType(_F32, 8)


class _Loop:
    """An LLVM counted loop under construction (see :func:`loop_open`)."""

    def __init__(self, index, carried, head, done):
        self.index, self.carried, self.head, self.done = index, carried, head, done


def loop_open(builder, name: str, start, stop, inits) -> _Loop:
    """Open ``for index in range(start, stop)`` in LLVM IR, carrying one value per ``inits`` entry (phi nodes
    that start at those values). Leaves the builder in the loop body; :func:`loop_close` ends the body."""
    fn = builder.function
    entry = builder.block
    head = fn.append_basic_block(f"{name}_head")
    body = fn.append_basic_block(f"{name}_body")
    done = fn.append_basic_block(f"{name}_done")
    builder.branch(head)
    builder.position_at_end(head)
    index = builder.phi(_I64)
    index.add_incoming(start, entry)
    carried = []
    for value in inits:
        ph = builder.phi(value.type)
        ph.add_incoming(value, entry)
        carried.append(ph)
    builder.cbranch(builder.icmp_signed("<", index, stop), body, done)
    builder.position_at_end(body)
    return _Loop(index, carried, head, done)


def loop_close(builder, loop: _Loop, new_values) -> None:
    """End the body of ``loop``: the carried values become ``new_values``, the index steps by one; leaves the
    builder after the loop, where ``loop.carried`` hold the final values."""
    index_next = builder.add(loop.index, _ir.Constant(_I64, 1))
    body_end = builder.block
    builder.branch(loop.head)
    loop.index.add_incoming(index_next, body_end)
    for ph, value in zip(loop.carried, new_values):
        ph.add_incoming(value, body_end)
    builder.position_at_end(loop.done)


def _splat(builder, scalar, ty):
    undef = _ir.Constant(ty, _ir.Undefined)
    v = builder.insert_element(undef, scalar, _ir.Constant(_ir.IntType(32), 0))
    return builder.shuffle_vector(v, undef, _ir.Constant(_ir.VectorType(_ir.IntType(32), ty.count), [0] * ty.count))


def _make_micro_f32(R: int, C: int, TT: int):
    """Intrinsic ``mk(xt, indices, data, p0, p1, k0, acc, a_off, t_off, w_off, w_stride)``:
    for p in [p0, p1): for c < C, r < R:  acc_reg[r, :TT] += data.flat[w_off + p*w_stride + r*C + c]
    * xt[indices[p]*C + c - k0, t_off : t_off + TT]; then acc.flat[a_off + r*64 : ... + TT] += acc_reg[r].
    R rows x TT tokens of accumulators (TT a multiple of 8) stay in registers."""
    V = TT // 8

    @_intrinsic
    def mk(typingctx, xt, indices, data, p0, p1, k0, acc, a_off, t_off, w_off, w_stride):
        sig = _types.void(xt, indices, data, _types.int64, _types.int64, _types.int64, acc, _types.int64,
                          _types.int64, _types.int64, _types.int64)
        is_int8 = data.dtype == _types.int8

        def codegen(context, builder, signature, args):
            xt_a = context.make_array(signature.args[0])(context, builder, args[0])
            idx_a = context.make_array(signature.args[1])(context, builder, args[1])
            dat_a = context.make_array(signature.args[2])(context, builder, args[2])
            acc_a = context.make_array(signature.args[6])(context, builder, args[6])
            _, _, _, p0v, p1v, k0v, _, a_offv, t_offv, w_offv, w_strv = args
            xt_p, idx_p, dat_p, acc_p = xt_a.data, idx_a.data, dat_a.data, acc_a.data
            fma = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(_V8F, [_V8F] * 3),
                                                  "llvm.fma.v8f32")
            prefetch = _cgutils.get_or_insert_function(
                builder.module,
                _ir.FunctionType(_ir.VoidType(), [_ir.IntType(8).as_pointer()] + [_ir.IntType(32)] * 3),
                "llvm.prefetch.p0",
            )
            loop = loop_open(builder, "mk", p0v, p1v, [_ir.Constant(_V8F, [0.0] * 8)] * (R * V))
            p, accs = loop.index, loop.carried
            col = builder.sext(builder.load(builder.gep(idx_p, [p])), _I64)
            if PREFETCH:
                # Prefetch the X row of a block PREFETCH ahead (L2 -> L1; the rows are visited in random order).
                pf = builder.add(p, _ir.Constant(_I64, PREFETCH))
                last = builder.sub(p1v, _ir.Constant(_I64, 1))
                pf = builder.select(builder.icmp_signed("<", pf, p1v), pf, last)
                pcol = builder.sext(builder.load(builder.gep(idx_p, [pf])), _I64)
                prow = builder.add(builder.mul(builder.sub(builder.mul(pcol, _ir.Constant(_I64, C)), k0v),
                                               _ir.Constant(_I64, 64)), t_offv)
                i8p = builder.bitcast(builder.gep(xt_p, [prow]), _ir.IntType(8).as_pointer())
                builder.call(prefetch, [i8p, _ir.Constant(_ir.IntType(32), 0), _ir.Constant(_ir.IntType(32), 3),
                                        _ir.Constant(_ir.IntType(32), 1)])
            row0 = builder.sub(builder.mul(col, _ir.Constant(_I64, C)), k0v)
            wbase = builder.add(w_offv, builder.mul(p, w_strv))
            new = list(accs)
            for c in range(C):
                xrow = builder.add(builder.mul(builder.add(row0, _ir.Constant(_I64, c)), _ir.Constant(_I64, 64)),
                                   t_offv)
                xs = []
                for v in range(V):
                    ptr = builder.gep(xt_p, [builder.add(xrow, _ir.Constant(_I64, 8 * v))])
                    xs.append(builder.load(builder.bitcast(ptr, _V8F.as_pointer()), align=4))
                for r in range(R):
                    wp = builder.gep(dat_p, [builder.add(wbase, _ir.Constant(_I64, r * C + c))])
                    w = builder.load(wp)
                    if is_int8:
                        w = builder.sitofp(w, _F32)
                    wv = _splat(builder, w, _V8F)
                    for v in range(V):
                        new[r * V + v] = builder.call(fma, [wv, xs[v], new[r * V + v]])
            loop_close(builder, loop, new)
            for r in range(R):
                for v in range(V):
                    off = builder.add(a_offv, _ir.Constant(_I64, r * 64 + 8 * v))
                    ptr = builder.bitcast(builder.gep(acc_p, [off]), _V8F.as_pointer())
                    old = builder.load(ptr, align=4)
                    builder.store(builder.fadd(old, accs[r * V + v]), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return mk


def _shuf(builder, a, b, mask):
    return builder.shuffle_vector(a, b, _ir.Constant(_ir.VectorType(_ir.IntType(32), 8), mask))


def _transpose8(builder, rows):
    """8 x 8 float32 transpose of 8 <8 x float> values (unpack / shuffle / 128-bit permute, 24 shuffles)."""
    lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    t = []
    for i in range(0, 8, 2):
        t += [_shuf(builder, rows[i], rows[i + 1], lo), _shuf(builder, rows[i], rows[i + 1], hi)]
    # t = [t0, t1, t2, t3, t4, t5, t6, t7] = lo/hi of pairs (0,1), (2,3), (4,5), (6,7)
    m_a, m_b = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    s = [
        _shuf(builder, t[0], t[2], m_a), _shuf(builder, t[0], t[2], m_b),
        _shuf(builder, t[1], t[3], m_a), _shuf(builder, t[1], t[3], m_b),
        _shuf(builder, t[4], t[6], m_a), _shuf(builder, t[4], t[6], m_b),
        _shuf(builder, t[5], t[7], m_a), _shuf(builder, t[5], t[7], m_b),
    ]
    low, high = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    cols = [None] * 8
    for j in range(4):
        cols[j] = _shuf(builder, s[j], s[j + 4], low)
        cols[j + 4] = _shuf(builder, s[j], s[j + 4], high)
    return cols


@_intrinsic
def tr8(typingctx, src, s_off, s_stride, dst, d_off, d_stride):
    """8 x 8 float32 transpose: dst.flat[d_off + j*d_stride + i] = src.flat[s_off + i*s_stride + j]
    (unpack / shuffle / 128-bit permute, 24 shuffles for 64 values)."""
    sig = _types.void(src, _types.int64, _types.int64, dst, _types.int64, _types.int64)

    def codegen(context, builder, signature, args):
        sp = context.make_array(signature.args[0])(context, builder, args[0]).data
        dp = context.make_array(signature.args[3])(context, builder, args[3]).data
        _, so, ss, _, do, ds = args
        rows = []
        for i in range(8):
            off = builder.add(so, builder.mul(ss, _ir.Constant(_I64, i)))
            rows.append(builder.load(builder.bitcast(builder.gep(sp, [off]), _V8F.as_pointer()), align=4))
        cols = _transpose8(builder, rows)
        for j in range(8):
            off = builder.add(do, builder.mul(ds, _ir.Constant(_I64, j)))
            builder.store(cols[j], builder.bitcast(builder.gep(dp, [off]), _V8F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@_intrinsic
def tr8_add(typingctx, src, s_off, s_stride, dst, d_off, d_stride, res):
    """``dst.flat[d_off + j*d_stride + i] = src.flat[s_off + i*s_stride + j] + res.flat[d_off + j*d_stride + i]``
    (res has dst's layout and may be dst itself: each vector is read before it is written)."""
    sig = _types.void(src, _types.int64, _types.int64, dst, _types.int64, _types.int64, res)

    def codegen(context, builder, signature, args):
        sp = context.make_array(signature.args[0])(context, builder, args[0]).data
        dp = context.make_array(signature.args[3])(context, builder, args[3]).data
        rp = context.make_array(signature.args[6])(context, builder, args[6]).data
        _, so, ss, _, do, ds, _ = args
        rows = []
        for i in range(8):
            off = builder.add(so, builder.mul(ss, _ir.Constant(_I64, i)))
            rows.append(builder.load(builder.bitcast(builder.gep(sp, [off]), _V8F.as_pointer()), align=4))
        cols = _transpose8(builder, rows)
        for j in range(8):
            off = builder.add(do, builder.mul(ds, _ir.Constant(_I64, j)))
            r = builder.load(builder.bitcast(builder.gep(rp, [off]), _V8F.as_pointer()), align=4)
            builder.store(builder.fadd(cols[j], r), builder.bitcast(builder.gep(dp, [off]), _V8F.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return sig, codegen


def _python_micro(R: int, C: int, TT: int):
    """Pure-Python twin of ``_make_micro_f32`` (used with NUMBA_DISABLE_JIT=1, e.g. to measure coverage)."""

    def mk(xt, indices, data, p0, p1, k0, acc, a_off, t_off, w_off, w_stride):
        xf, df, af = xt.reshape(-1), data.reshape(-1), acc.reshape(-1)
        regs = np.zeros((R, TT), np.float32)
        for p in range(p0, p1):
            for c in range(C):
                o = (indices[p] * C + c - k0) * T + t_off
                for r in range(R):
                    regs[r] += np.float32(df[w_off + p * w_stride + r * C + c]) * xf[o:o + TT]
        for r in range(R):
            af[a_off + r * T:a_off + r * T + TT] += regs[r]

    return mk


def _python_tr8(src, s_off, s_stride, dst, d_off, d_stride):
    sf, df = src.reshape(-1), dst.reshape(-1)
    for i in range(8):
        for j in range(8):
            df[d_off + j * d_stride + i] = sf[s_off + i * s_stride + j]


def _python_tr8_add(src, s_off, s_stride, dst, d_off, d_stride, res):
    sf, df, rf = src.reshape(-1), dst.reshape(-1), res.reshape(-1)
    for i in range(8):
        for j in range(8):
            o = d_off + j * d_stride + i
            df[o] = sf[s_off + i * s_stride + j] + rf[o]


if _numba_config.DISABLE_JIT:
    tr8 = _python_tr8  # noqa: F811
    tr8_add = _python_tr8_add  # noqa: F811
    _make_micro_f32 = _python_micro  # noqa: F811

mk_1x1_64 = _make_micro_f32(1, 1, 64)  # 1 row x 64 tokens
mk_1x4_64 = _make_micro_f32(1, 4, 64)  # 1 row x 64 tokens, 4 input channels per block


# ------------------------------------------------------------------------------------------ one task
@njit(**_OPTS)
def pack_tile(x, t0, tn, k0, kn, xt):
    """xt[k, t] = x[t0 + t, k0 + k] for t < tn; 0 for the padding tokens t >= tn."""
    K = x.shape[1]
    tf = tn - tn % 8
    kf = kn - kn % 8
    for kb in range(0, kf, 8):
        for tb in range(0, tf, 8):
            tr8(x, (t0 + tb) * K + k0 + kb, K, xt, kb * T + tb, T)
    for t in range(tf, tn):
        for k in range(kf):
            xt[k, t] = x[t0 + t, k0 + k]
    for t in range(tn):
        for k in range(kf, kn):
            xt[k, t] = x[t0 + t, k0 + k]
    if tn < T:
        for k in range(kn):
            for t in range(tn, T):
                xt[k, t] = np.float32(0.0)


@njit(**_OPTS)
def epilogue(acc, nrows, r0, t0, tn, scales, bias, residual, out, flags):
    """acc rows -> out[t0:t0+tn, r0:r0+nrows]: scale, bias, GELU on contiguous token rows, then a transposed
    write with the residual add. flags: [has_scales, has_bias, activation (0 none, 1 gelu), has_residual]."""
    for i in range(nrows):
        a = acc[i]
        if flags[0] != 0:
            s = scales[r0 + i]
            for t in range(T):
                a[t] *= s
        if flags[1] != 0:
            bv = bias[r0 + i]
            for t in range(T):
                a[t] += bv
        if flags[2] == 1:
            gelu_vec(a)
    # 8 x 8 transposes stored straight into out's rows (with the residual read just before each vector is
    # written, so out may be the residual itself); the ragged edges element by element.
    tf = tn - tn % 8
    nf = nrows - nrows % 8
    has_res = flags[3] != 0
    N = out.shape[1]
    # tokens outer, rows inner: the 8 output rows of a token block are finished left to right (out's rows are
    # 1.5-12 KB apart, so rows-outer touched 64 pages per pass: measured 1.2-1.9x slower)
    for tb in range(0, tf, 8):
        for ib in range(0, nf, 8):
            if has_res:
                tr8_add(acc, ib * T + tb, T, out, (t0 + tb) * N + r0 + ib, N, residual)
            else:
                tr8(acc, ib * T + tb, T, out, (t0 + tb) * N + r0 + ib, N)
    for t in range(tn):
        lo = nf if t < tf else 0
        orow = out[t0 + t]
        if has_res:
            rrow = residual[t0 + t]
            for i in range(lo, nrows):
                orow[r0 + i] = acc[i, t] + rrow[r0 + i]
        else:
            for i in range(lo, nrows):
                orow[r0 + i] = acc[i, t]


@njit(**_OPTS)
def run_task(task, x, indptr, indices, data, code, scales, bias, residual, out, flags, chunk, sub, panel, xt, acc,
             cur):
    """One (token tile, chunk of block rows) task, in the caller's workspace xt / acc / cur. The chunk is done in
    sub-chunks of ``sub`` block rows (accumulators that stay in L2); with a single panel (K <= panel) the tile is
    packed once for the whole chunk, else once per panel and sub-chunk."""
    M, K = x.shape
    br = data.shape[1]
    bc = data.shape[2]
    nbr = indptr.shape[0] - 1
    n_chunks = (nbr + chunk - 1) // chunk
    tile = task // n_chunks
    ch = task - tile * n_chunks
    t0 = tile * T
    tn = min(T, M - t0)
    b0 = ch * chunk
    b1 = min(nbr, b0 + chunk)
    single = panel >= K
    if single:
        pack_tile(x, t0, tn, 0, K, xt)
    for s0 in range(b0, b1, sub):
        s1 = min(b1, s0 + sub)
        nrows = (s1 - s0) * br
        acc[:nrows, :] = 0.0
        for b in range(s0, s1):
            cur[b - s0] = indptr[b]
        k0 = 0
        while k0 < K:
            kn = min(panel, K - k0)
            if not single:
                pack_tile(x, t0, tn, k0, kn, xt)
            cend = (k0 + kn) // bc
            for b in range(s0, s1):
                i = b - s0
                p = cur[i]
                p1 = indptr[b + 1]
                if code == 0:
                    cur[i] = rows_generic(xt, k0, indices, data, p, p1, cend, acc, i * br)
                    continue
                pe = p
                while pe < p1 and indices[pe] < cend:
                    pe += 1
                if pe > p:
                    if code == 2:  # 1x1 ((4k) x 1 blocks take the direct path, run_task_direct)
                        mk_1x1_64(xt, indices, data, p, pe, k0, acc, i * T, 0, 0, 1)
                    else:  # 1x4
                        mk_1x4_64(xt, indices, data, p, pe, k0, acc, i * T, 0, 0, 4)
                cur[i] = pe
            k0 += kn
        epilogue(acc, nrows, s0 * br, t0, tn, scales, bias, residual, out, flags)


@njit(parallel=True, **_OPTS)
def spmm_f32act(x, indptr, indices, data, code, scales, bias, residual, out, flags, chunk, sub, panel, n_tasks,
                xt_ws, acc_ws, cur_ws):
    """Y = act(X W^T * scales + bias) + residual for float32 or int8 block values and float32 X.
    Worker w (one per workspace slot) runs tasks w, w + n_workers, ..."""
    n_workers = xt_ws.shape[0]
    for w in prange(n_workers):
        for task in range(w, n_tasks, n_workers):
            run_task(task, x, indptr, indices, data, code, scales, bias, residual, out, flags, chunk, sub, panel,
                     xt_ws[w], acc_ws[w], cur_ws[w])




# ------------------------------------------------------------------------------------------ direct path ((4k) x 1)
# The packed tile is slab-major, ``xs[s, k, 0:16]`` (16 tokens of slab s for input column k, one cache line), so
# one pass over the block rows for one slab touches K x 64 B of X (24 KB at K = 384: L1; 192 KB at K = 3072: L2)
# and needs no K panels. The micro-kernel keeps 4 output rows x 16 tokens in 8 ymm registers for a whole block
# row and then finishes them in registers: ``acc * scale + bias``, GELU, a 4 x 8 transpose and 16-byte stores
# straight into ``out`` (with the residual added), so there is no accumulator buffer and no separate epilogue.
S16 = 16  # tokens per slab
_F4 = _ir.VectorType(_F32, 4)


def _gelu_ir(builder, v, module):
    """0.5 v (1 + erf(v / sqrt 2)) on <8 x float> with erf32's rational approximation (clamped to [-4, 4])."""
    fma = _cgutils.get_or_insert_function(module, _ir.FunctionType(_V8F, [_V8F] * 3), "llvm.fma.v8f32")
    vmin = _cgutils.get_or_insert_function(module, _ir.FunctionType(_V8F, [_V8F] * 2), "llvm.minnum.v8f32")
    vmax = _cgutils.get_or_insert_function(module, _ir.FunctionType(_V8F, [_V8F] * 2), "llvm.maxnum.v8f32")

    def c(val):
        return _ir.Constant(_V8F, [float(np.float32(val))] * 8)

    a = builder.fmul(v, c(0.7071067811865476))
    x = builder.call(vmax, [builder.call(vmin, [a, c(4.0)]), c(-4.0)])
    x2 = builder.fmul(x, x)
    p = c(-2.72614225801306e-10)
    for k in (2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05, -7.34990630326855e-04,
              -2.95459980854025e-03, -1.60960333262415e-02):
        p = builder.call(fma, [p, x2, c(k)])
    q = c(-1.45660718464996e-05)
    for k in (-2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02):
        q = builder.call(fma, [q, x2, c(k)])
    erf = builder.fdiv(builder.fmul(x, p), q)
    half_v = builder.fmul(v, c(0.5))
    return builder.call(fma, [half_v, erf, half_v])


def direct_finish(builder, ys, out_p, res_p, o_offv, n_outv, nvv, modev, tokens=tuple(range(16))):
    """Finish a 4 rows x 16 tokens register tile ``ys[r * 2 + v]`` (<8 x float>; element e holds token
    ``tokens[8v + e]`` of row r, in order unless the caller's accumulators hold them permuted): GELU if
    ``mode & 1``, 4 x 8 transposes, and for tokens ``t < nv`` a 16-byte store of the 4 rows to
    ``out.flat[o_off + t * n_out]`` (plus ``residual`` at the same offset if ``mode & 2``). A full slab without
    residual (the common case) takes 16 plain stores; otherwise each token tests ``t < nv`` and the residual."""
    R, V = 4, 2
    fn = builder.function
    mod = builder.module
    # GELU (mode & 1)
    one = _ir.Constant(_I64, 1)
    is_gelu = builder.icmp_signed("!=", builder.and_(modev, one), _ir.Constant(_I64, 0))
    pre = builder.block
    gelu_bb = fn.append_basic_block("mkd_gelu")
    merge = fn.append_basic_block("mkd_merge")
    builder.cbranch(is_gelu, gelu_bb, merge)
    builder.position_at_end(gelu_bb)
    gs = [_gelu_ir(builder, y, mod) for y in ys]
    gelu_end = builder.block
    builder.branch(merge)
    builder.position_at_end(merge)
    fin = []
    for y, g in zip(ys, gs):
        ph = builder.phi(_V8F)
        ph.add_incoming(y, pre)
        ph.add_incoming(g, gelu_end)
        fin.append(ph)
    # 4 x 8 transposes: token t of group v -> <4 x float> of the 4 rows
    lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    m_a, m_b = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    cols = []
    for v in range(V):
        r0, r1, r2, r3 = (fin[r * V + v] for r in range(R))
        a, b = _shuf(builder, r0, r1, lo), _shuf(builder, r0, r1, hi)
        c_, d = _shuf(builder, r2, r3, lo), _shuf(builder, r2, r3, hi)
        e, f = _shuf(builder, a, c_, m_a), _shuf(builder, a, c_, m_b)
        g, h = _shuf(builder, b, d, m_a), _shuf(builder, b, d, m_b)
        halves = []
        for q in (e, f, g, h):
            halves.append(builder.shuffle_vector(q, q, _ir.Constant(_ir.VectorType(_ir.IntType(32), 4),
                                                                   [0, 1, 2, 3])))
        for q in (e, f, g, h):
            halves.append(builder.shuffle_vector(q, q, _ir.Constant(_ir.VectorType(_ir.IntType(32), 4),
                                                                   [4, 5, 6, 7])))
        cols += halves  # tokens 8v + 0..7
    has_res = builder.icmp_signed("!=", builder.and_(modev, _ir.Constant(_I64, 2)), _ir.Constant(_I64, 0))
    full = builder.and_(builder.icmp_signed("==", nvv, _ir.Constant(_I64, S16)), builder.not_(has_res))
    plain_bb = fn.append_basic_block("mkd_plain")
    each_bb = fn.append_basic_block("mkd_each")
    done_bb = fn.append_basic_block("mkd_done")
    builder.cbranch(full, plain_bb, each_bb)

    def ptr_of(base_p, t):
        off = builder.add(o_offv, builder.mul(n_outv, _ir.Constant(_I64, t)))
        return builder.bitcast(builder.gep(base_p, [off]), _F4.as_pointer())

    builder.position_at_end(plain_bb)
    for c in range(S16):
        builder.store(cols[c], ptr_of(out_p, tokens[c]), align=4)
    builder.branch(done_bb)
    builder.position_at_end(each_bb)
    for c in range(S16):
        t = tokens[c]
        st = fn.append_basic_block(f"mkd_st{c}")
        nxt = fn.append_basic_block(f"mkd_nx{c}")
        builder.cbranch(builder.icmp_signed("<", _ir.Constant(_I64, t), nvv), st, nxt)
        builder.position_at_end(st)
        optr = ptr_of(out_p, t)
        with builder.if_else(has_res) as (then, otherwise):
            with then:
                rv = builder.load(ptr_of(res_p, t), align=4)
                builder.store(builder.fadd(cols[c], rv), optr, align=4)
            with otherwise:
                builder.store(cols[c], optr, align=4)
        builder.branch(nxt)
        builder.position_at_end(nxt)
    builder.branch(done_bb)
    builder.position_at_end(done_bb)


def _make_direct_f32(C: int):
    """Intrinsic ``mkd(xs, indices, data, p0, p1, x_off, w_off, w_stride, out, o_off, n_out, nv, scales, bias,
    s_off, residual, mode)``: 4 rows x 16 tokens in registers,
    ``acc[r, t] = sum_p sum_c data.flat[w_off + p*w_stride + r*C + c] * xs.flat[x_off + (indices[p]*C + c)*16 + t]``,
    then ``y = acc * scales[s_off + r] + bias[s_off + r]``, GELU if ``mode & 1``, and for tokens ``t < nv``:
    ``out.flat[o_off + t*n_out + r] = y[r, t] (+ residual.flat[same] if mode & 2)``."""
    R, V = 4, 2

    @_intrinsic
    def mkd(typingctx, xs, indices, data, p0, p1, x_off, w_off, w_stride, out, o_off, n_out, nv, scales, bias,
            s_off, residual, mode):
        i64 = _types.int64
        sig = _types.void(xs, indices, data, i64, i64, i64, i64, i64, out, i64, i64, i64, scales, bias, i64,
                          residual, i64)
        is_int8 = data.dtype == _types.int8

        def codegen(context, builder, signature, args):
            def ptr(i):
                return context.make_array(signature.args[i])(context, builder, args[i]).data

            xs_p, idx_p, dat_p, out_p, sc_p, bi_p, res_p = ptr(0), ptr(1), ptr(2), ptr(8), ptr(12), ptr(13), ptr(15)
            p0v, p1v, x_offv, w_offv, w_strv = args[3], args[4], args[5], args[6], args[7]
            o_offv, n_outv, nvv, s_offv, modev = args[9], args[10], args[11], args[14], args[16]
            mod = builder.module
            fma = _cgutils.get_or_insert_function(mod, _ir.FunctionType(_V8F, [_V8F] * 3), "llvm.fma.v8f32")
            loop = loop_open(builder, "mkd", p0v, p1v, [_ir.Constant(_V8F, [0.0] * 8)] * (R * V))
            p, accs = loop.index, loop.carried
            col = builder.sext(builder.load(builder.gep(idx_p, [p])), _I64)
            row0 = builder.add(builder.mul(builder.mul(col, _ir.Constant(_I64, C)), _ir.Constant(_I64, S16)), x_offv)
            wbase = builder.add(w_offv, builder.mul(p, w_strv))
            new = list(accs)
            for c in range(C):
                xs_v = []
                for v in range(V):
                    xp = builder.gep(xs_p, [builder.add(row0, _ir.Constant(_I64, c * S16 + 8 * v))])
                    xs_v.append(builder.load(builder.bitcast(xp, _V8F.as_pointer()), align=4))
                for r in range(R):
                    w = builder.load(builder.gep(dat_p, [builder.add(wbase, _ir.Constant(_I64, r * C + c))]))
                    if is_int8:
                        w = builder.sitofp(w, _F32)
                    wv = _splat(builder, w, _V8F)
                    for v in range(V):
                        new[r * V + v] = builder.call(fma, [wv, xs_v[v], new[r * V + v]])
            loop_close(builder, loop, new)
            ys = []
            for r in range(R):
                s_idx = builder.add(s_offv, _ir.Constant(_I64, r))
                sv = _splat(builder, builder.load(builder.gep(sc_p, [s_idx])), _V8F)
                bv = _splat(builder, builder.load(builder.gep(bi_p, [s_idx])), _V8F)
                for v in range(V):
                    ys.append(builder.call(fma, [accs[r * V + v], sv, bv]))
            direct_finish(builder, ys, out_p, res_p, o_offv, n_outv, nvv, modev)
            return context.get_dummy_value()

        return sig, codegen

    return mkd


def _python_direct(C: int):
    """Pure-Python twin of ``_make_direct_f32`` (NUMBA_DISABLE_JIT=1)."""

    def mkd(xs, indices, data, p0, p1, x_off, w_off, w_stride, out, o_off, n_out, nv, scales, bias, s_off,
            residual, mode):
        xf, df, of, rf = xs.reshape(-1), data.reshape(-1), out.reshape(-1), residual.reshape(-1)
        acc = np.zeros((4, S16), np.float32)
        for p in range(p0, p1):
            for c in range(C):
                o = x_off + (int(indices[p]) * C + c) * S16
                for r in range(4):
                    acc[r] += np.float32(df[w_off + p * w_stride + r * C + c]) * xf[o:o + S16]
        for r in range(4):
            acc[r] = acc[r] * scales[s_off + r] + bias[s_off + r]
        python_direct_finish(acc, of, rf, o_off, n_out, nv, mode)

    return mkd


def python_direct_finish(ys, of, rf, o_off, n_out, nv, mode):
    """Pure-Python twin of ``direct_finish``: GELU if ``mode & 1``, then the first ``nv`` tokens of the 4 output
    rows ``ys`` (4 x S16, scaled and biased) written token-major at ``o_off``, plus the residual if ``mode & 2``."""
    for r in range(4):
        if mode & 1:
            gelu_vec(ys[r])
    for t in range(nv):
        for r in range(4):
            i = o_off + t * n_out + r
            of[i] = ys[r, t] + (rf[i] if mode & 2 else np.float32(0.0))


if _numba_config.DISABLE_JIT:
    _make_direct_f32 = _python_direct  # noqa: F811

mkd_4x1 = _make_direct_f32(1)


@njit(**_OPTS)
def pack_slabs(x, t0, tn, xs):
    """xs.flat[s*K*16 + k*16 + j] = x[t0 + 16 s + j, k] for 16 s + j < tn; 0 for the padding tokens of the last
    slab."""
    K = x.shape[1]
    tf = tn - tn % 8
    kf = K - K % 8
    for tb in range(0, tf, 8):
        base = (tb // S16) * K * S16 + tb % S16
        for kb in range(0, kf, 8):
            tr8(x, (t0 + tb) * K + kb, K, xs, base + kb * S16, S16)
    for t in range(tn):
        base = (t // S16) * K * S16 + t % S16
        xr = x[t0 + t]
        k_lo = kf if t < tf else 0
        for k in range(k_lo, K):
            xs[base + k * S16] = xr[k]
    ns = (tn + S16 - 1) // S16
    if tn < ns * S16:
        base = (ns - 1) * K * S16
        for k in range(K):
            for j in range(tn % S16, S16):
                xs[base + k * S16 + j] = np.float32(0.0)


@njit(**_OPTS)
def widen_blocks(data, p0, p1, wbuf):
    """wbuf[:(p1 - p0) * rows] = float32(data[p0:p1]): the int8 weights of one sub-chunk, converted once per tile
    and reused by its slabs (1 thread, 90%, K <= 768: 1.08-1.17x faster than a scalar convert + broadcast per
    weight inside the micro-kernel, 0.82-0.97x the float32 kernel)."""
    flat = data.reshape(-1)
    br = data.shape[1]
    o = p0 * br
    for i in range((p1 - p0) * br):
        wbuf[i] = np.float32(flat[o + i])


@njit(**_OPTS)
def run_task_direct(task, x, indptr, indices, data, scales, bias, residual, out, mode, tile, chunk, sub, xs, wbuf):
    """One (token tile, chunk of block rows) task for (4k) x 1 blocks: pack the tile slab-major, then per
    sub-chunk of block rows (weights reused from L1/L2 across the slabs), per slab, per block row: mkd."""
    M, K = x.shape
    br = data.shape[1]
    nbr = indptr.shape[0] - 1
    N = out.shape[1]
    n_chunks = (nbr + chunk - 1) // chunk
    ti = task // n_chunks
    ch = task - ti * n_chunks
    t0 = ti * tile
    tn = min(tile, M - t0)
    ns = (tn + S16 - 1) // S16
    pack_slabs(x, t0, tn, xs)
    b0 = ch * chunk
    b1 = min(nbr, b0 + chunk)
    # int8 weights: converted per sub-chunk into wbuf when 3-4 slabs reuse them (with 1-2 slabs, K >= 1536, the
    # conversion outweighs the per-weight conversion inside the micro-kernel: 0.6-0.8x of it, measured)
    widen = wbuf.shape[0] > 0 and ns >= 3
    for s0 in range(b0, b1, sub):
        s1 = min(b1, s0 + sub)
        pw = indptr[s0]
        if widen:
            widen_blocks(data, pw, indptr[s1], wbuf)
        for s in range(ns):
            nv = min(S16, tn - s * S16)
            x_off = s * K * S16
            o_base = (t0 + s * S16) * N
            for b in range(s0, s1):
                p = indptr[b]
                p1 = indptr[b + 1]
                for rs in range(0, br, 4):
                    o0 = b * br + rs
                    if widen:
                        mkd_4x1(xs, indices, wbuf, p, p1, x_off, rs - pw * br, br, out, o_base + o0, N, nv, scales,
                                bias, o0, residual, mode)
                    else:
                        mkd_4x1(xs, indices, data, p, p1, x_off, rs, br, out, o_base + o0, N, nv, scales, bias, o0,
                                residual, mode)


@_intrinsic
def fetch_add(typingctx, arr, val):
    """Atomically ``old = arr[0]; arr[0] += val; return old`` (int64 array): a shared task counter."""
    sig = _types.int64(arr, _types.int64)

    def codegen(context, builder, signature, args):
        ptr = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", ptr, args[1], "monotonic")

    return sig, codegen


def _python_fetch_add(arr, val):
    old = int(arr[0])
    arr[0] += val
    return old


if _numba_config.DISABLE_JIT:
    fetch_add = _python_fetch_add  # noqa: F811


@njit(parallel=True, **_OPTS)
def spmm_direct(x, indptr, indices, data, scales, bias, residual, out, mode, tile, chunk, sub, n_tasks, xs_ws,
                counter, w_ws):
    """(4k) x 1 blocks, float32 X, one worker per workspace slot; the tasks are handed out dynamically through
    ``counter`` (0 on entry), so a worker that the OS delays does not hold the others up."""
    n_workers = xs_ws.shape[0]
    for w in prange(n_workers):
        task = fetch_add(counter, 1)
        while task < n_tasks:
            run_task_direct(task, x, indptr, indices, data, scales, bias, residual, out, mode, tile, chunk, sub,
                            xs_ws[w], w_ws[w])
            task = fetch_add(counter, 1)


@njit(**_OPTS)
def spmm_direct_serial(x, indptr, indices, data, scales, bias, residual, out, mode, tile, chunk, sub, n_tasks,
                       xs_ws, counter, w_ws):
    """spmm_direct on the calling thread (one worker: no parallel launch, which costs ~0.1 ms per call)."""
    for task in range(n_tasks):
        run_task_direct(task, x, indptr, indices, data, scales, bias, residual, out, mode, tile, chunk, sub,
                        xs_ws[0], w_ws[0])


@njit(**_OPTS)
def spmm_f32act_serial(x, indptr, indices, data, code, scales, bias, residual, out, flags, chunk, sub, panel,
                       n_tasks, xt_ws, acc_ws, cur_ws):
    """spmm_f32act on the calling thread."""
    for task in range(n_tasks):
        run_task(task, x, indptr, indices, data, code, scales, bias, residual, out, flags, chunk, sub, panel,
                 xt_ws[0], acc_ws[0], cur_ws[0])
