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
            fn = builder.function
            fma = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(_V8F, [_V8F] * 3),
                                                  "llvm.fma.v8f32")
            prefetch = _cgutils.get_or_insert_function(
                builder.module,
                _ir.FunctionType(_ir.VoidType(), [_ir.IntType(8).as_pointer()] + [_ir.IntType(32)] * 3),
                "llvm.prefetch.p0",
            )
            entry = builder.block
            head = fn.append_basic_block("mk_head")
            body = fn.append_basic_block("mk_body")
            done = fn.append_basic_block("mk_done")
            builder.branch(head)
            builder.position_at_end(head)
            p = builder.phi(_I64)
            p.add_incoming(p0v, entry)
            zero = _ir.Constant(_V8F, [0.0] * 8)
            accs = []
            for _ in range(R * V):
                ph = builder.phi(_V8F)
                ph.add_incoming(zero, entry)
                accs.append(ph)
            builder.cbranch(builder.icmp_signed("<", p, p1v), body, done)
            builder.position_at_end(body)
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
            p_next = builder.add(p, _ir.Constant(_I64, 1))
            body_end = builder.block
            builder.branch(head)
            p.add_incoming(p_next, body_end)
            for ph, nv in zip(accs, new):
                ph.add_incoming(nv, body_end)
            builder.position_at_end(done)
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

mk_4x1_16 = _make_micro_f32(4, 1, 16)  # 4 rows x 16 tokens: 8 ymm accumulators
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
                    if code == 1:  # (4 k) x 1: slabs of 4 rows x 16 tokens in registers
                        for rs in range(0, br, 4):
                            for ts in range(0, tn, 16):  # slabs past the last token are skipped
                                mk_4x1_16(xt, indices, data, p, pe, k0, acc, (i * br + rs) * T + ts, ts, rs, br)
                    elif code == 2:  # 1x1
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


