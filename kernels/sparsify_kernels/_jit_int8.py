"""Private jitted int8 x int8 -> int32 kernels (imported lazily by :mod:`sparsify.kernels.int8`).

Activations are quantized per tensor to **u7** (``0..127``, with a zero point), weights are int8 per output
channel. The AVX2 micro-kernel multiplies with ``vpmaddubsw`` (u8 x s8 -> pairs summed into saturating int16)
and widens with ``vpmaddwd(., 1)`` (pairs of int16 summed into int32). With u7 activations a pair is at most
``2 * 127 * 128 = 32512 <= 32767``: ``vpmaddubsw`` never saturates, for any int8 weight (-128 included).

Layout (4x1-family blocks, ``rows % 4 == 0`` and ``cols == 1``): the non-zero blocks of each block row are taken
four at a time (a *quad*, padded with zero weights); an int32 lane holds one token and the four bytes of the
quad's four input channels. The packed X tile is group-major, ``xg[g, k, 0:32]``: the 32 u8 tokens of group
``g`` for input channel ``k``, the middle two 8-byte quarters swapped, so that ``vpunpcklbw``/``vpunpckhbw``
(which work per 128-bit lane) followed by ``vpunpcklwd``/``vpunpckhwd`` give tokens ``0-3|8-11`` and
``4-7|12-15`` of a 16-token slab (``lo``) or of the next one (``hi``). (The portable path keeps the channel-major
``xt[k, 0:64]`` of :func:`pack_tile_u8`.) The quad's weights for an output row are 4 contiguous bytes
(one ``vpbroadcastd``). 4 rows x 16 tokens = 8 int32 ymm accumulators stay in registers for a whole block row.

Nothing is compiled at import; everything is ``cache=True``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir as _ir
from numba import config as _numba_config
from numba import njit, prange
from numba.core import cgutils as _cgutils
from numba.core import types as _types
from numba.extending import intrinsic as _intrinsic

from ._jit import (_OPTS, _V8F, S16, T, _splat, _transpose8, direct_finish, epilogue, fetch_add,
                   loop_close, loop_open, python_direct_finish)

_I8 = _ir.IntType(8)
_I16 = _ir.IntType(16)
_I32 = _ir.IntType(32)
_I64 = _ir.IntType(64)
_V32B = _ir.VectorType(_I8, 32)
_V16W = _ir.VectorType(_I16, 16)
_V8D = _ir.VectorType(_I32, 8)
_QPERM = (0, 2, 1, 3)  # 8-token quarter q of a 32-token group is stored at quarter _QPERM[q]
G32 = 32  # tokens per group of the packed u7 tile (group-major: xg.flat[g*K*32 + k*32 + pos])
_QPOS = np.array([_QPERM[t // 8] * 8 + t % 8 for t in range(32)], np.int64)  # pos(t) inside a group


def _mask(idx):
    return _ir.Constant(_ir.VectorType(_I32, len(idx)), list(idx))


def _unpack_masks(n_per_lane: int, lane_elems: int, high: bool):
    """shufflevector mask of vpunpck{l,h}{bw,wd} on a 256-bit vector of ``2 * lane_elems`` elements."""
    half = lane_elems // 2
    m = []
    for lane in range(2):
        base = lane * lane_elems + (half if high else 0)
        for i in range(half):
            m += [base + i, 2 * lane_elems + base + i]
    return m


def _i8_quad_loop(builder, xt_p, idx_p, qw_p, q0v, q1v, x_offv, w_offv, w_strv, R, high):
    """The quad loop of the int8 micro-kernels; returns the 2R int32 accumulators (accs[2r] = tokens 0-3 | 8-11,
    accs[2r+1] = 4-7 | 12-15 of row r)."""
    xt_b = builder.bitcast(xt_p, _I8.as_pointer())
    qw_b = builder.bitcast(qw_p, _I8.as_pointer())
    maddubs = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(_V16W, [_V32B, _V32B]),
                                              "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(_V8D, [_V16W, _V16W]),
                                             "llvm.x86.avx2.pmadd.wd")
    ones = _ir.Constant(_V16W, [1] * 16)
    loop = loop_open(builder, "mk8", q0v, q1v, [_ir.Constant(_V8D, [0] * 8)] * (2 * R))
    q, accs = loop.index, loop.carried
    rows = []
    q4 = builder.mul(q, _ir.Constant(_I64, 4))
    for j in range(4):
        col = builder.sext(builder.load(builder.gep(idx_p, [builder.add(q4, _ir.Constant(_I64, j))])), _I64)
        off = builder.add(builder.mul(col, _ir.Constant(_I64, G32)), x_offv)
        rows.append(builder.load(builder.bitcast(builder.gep(xt_b, [off]), _V32B.as_pointer()), align=1))
    mb = _mask(_unpack_masks(8, 16, bool(high)))
    ab = builder.bitcast(builder.shuffle_vector(rows[0], rows[1], mb), _V16W)
    cd = builder.bitcast(builder.shuffle_vector(rows[2], rows[3], mb), _V16W)
    xs = [
        builder.bitcast(builder.shuffle_vector(ab, cd, _mask(_unpack_masks(4, 8, False))), _V32B),
        builder.bitcast(builder.shuffle_vector(ab, cd, _mask(_unpack_masks(4, 8, True))), _V32B),
    ]
    wbase = builder.add(w_offv, builder.mul(q, w_strv))
    new = list(accs)
    for r in range(R):
        wp = builder.gep(qw_b, [builder.add(wbase, _ir.Constant(_I64, 4 * r))])
        w32 = builder.load(builder.bitcast(wp, _I32.as_pointer()), align=1)
        undef = _ir.Constant(_V8D, _ir.Undefined)
        wv = builder.insert_element(undef, w32, _ir.Constant(_I32, 0))
        wv = builder.bitcast(builder.shuffle_vector(wv, undef, _mask([0] * 8)), _V32B)
        for v in range(2):
            p16 = builder.call(maddubs, [xs[v], wv])
            p32 = builder.call(maddwd, [p16, ones])
            new[2 * r + v] = builder.add(new[2 * r + v], p32)
    loop_close(builder, loop, new)
    return accs


_ACC_TOKENS = (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)  # token of each int32 lane of accs[2r], accs[2r+1]


def _i8_dequant(builder, accs, R, row0v, init_p, cs_p, bias_p):
    """accs + init (the zero-point correction, exact in int32), then float32 scale and bias: returns
    ys[2r + h] = <8 x float> of row r, lanes holding tokens ``_ACC_TOKENS[8h:8h + 8]`` (no shuffle back to token
    order: the finish stores each token where it belongs)."""
    fma = _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(_V8F, [_V8F] * 3), "llvm.fma.v8f32")
    ys = []
    for r in range(R):
        row = builder.add(row0v, _ir.Constant(_I64, r))
        iv = _splat(builder, builder.load(builder.gep(init_p, [row])), _V8D)
        cv = _splat(builder, builder.load(builder.gep(cs_p, [row])), _V8F)
        bv = _splat(builder, builder.load(builder.gep(bias_p, [row])), _V8F)
        for h in range(2):  # left in the accumulators' token order, _ACC_TOKENS: direct_finish stores by it
            f = builder.sitofp(builder.add(accs[2 * r + h], iv), _V8F)
            ys.append(builder.call(fma, [f, cv, bv]))
    return ys


def _make_micro_i8_direct(high: int):
    """Intrinsic ``mkd(xt, qidx, qw, q0, q1, x_off, w_off, w_stride, init, cs, bias, row0, out, o_off, n_out, nv,
    residual, mode)``: for the quads [q0, q1) of one block row, 4 rows, the 16 tokens of a slab (``high`` picks
    which half of the 32-token group at byte ``x_off`` of each packed row), in int32: ``acc[r, t] = init[row0 + r]
    + sum_q sum_j qw.flat[w_off + q*w_stride + 4r + j] * xt[qidx[4q + j], token t]``, dequantized in registers
    (``float(acc) * cs[row0 + r] + bias[row0 + r]``) and finished by ``direct_finish``: GELU if ``mode & 1``, the
    transposed 16-byte stores of tokens ``t < nv`` to ``out.flat[o_off + t*n_out]``, + residual if ``mode & 2``."""

    @_intrinsic
    def mkd(typingctx, xt, qidx, qw, q0, q1, x_off, w_off, w_stride, init, cs, bias, row0, out, o_off, n_out, nv,
            residual, mode):
        i64 = _types.int64
        sig = _types.void(xt, qidx, qw, i64, i64, i64, i64, i64, init, cs, bias, i64, out, i64, i64, i64, residual,
                          i64)

        def codegen(context, builder, signature, args):
            def ptr(i):
                return context.make_array(signature.args[i])(context, builder, args[i]).data

            accs = _i8_quad_loop(builder, ptr(0), ptr(1), ptr(2), args[3], args[4], args[5], args[6], args[7], 4,
                                 high)
            ys = _i8_dequant(builder, accs, 4, args[11], ptr(8), ptr(9), ptr(10))
            direct_finish(builder, ys, ptr(12), ptr(16), args[13], args[14], args[15], args[17], _ACC_TOKENS)
            return context.get_dummy_value()

        return sig, codegen

    return mkd


def _python_micro_i8_direct(high: int):
    """Pure-Python twin of ``_make_micro_i8_direct`` (NUMBA_DISABLE_JIT=1)."""
    def mkd(xt, qidx, qw, q0, q1, x_off, w_off, w_stride, init, cs, bias, row0, out, o_off, n_out, nv, residual,
            mode):
        xf, wf, of, rf = xt.reshape(-1), qw.reshape(-1), out.reshape(-1), residual.reshape(-1)
        tok = _QPOS[16 * high:16 * high + 16] + x_off
        y = np.zeros((4, S16), np.float32)
        for r in range(4):
            s = np.zeros(16, np.int64) + int(init[row0 + r])
            for q in range(q0, q1):
                for j in range(4):
                    xv = xf[int(qidx[4 * q + j]) * G32 + tok].astype(np.int64)
                    s += int(wf[w_off + q * w_stride + 4 * r + j]) * xv
            y[r] = s.astype(np.int32).astype(np.float32) * cs[row0 + r] + bias[row0 + r]
        python_direct_finish(y, of, rf, o_off, n_out, nv, mode)

    return mkd


if _numba_config.DISABLE_JIT:
    _make_micro_i8_direct = _python_micro_i8_direct  # noqa: F811

mkd8_lo = _make_micro_i8_direct(0)
mkd8_hi = _make_micro_i8_direct(1)


@_intrinsic
def tr8q(typingctx, src, s_off, s_stride, dst, d_off, d_stride, inv_s, zp):
    """8 x 8 transpose + u7 quantization: ``dst.flat[d_off + j*d_stride + i] = clip(rint(src.flat[s_off +
    i*s_stride + j] * inv_s) + zp, 0, 127)`` (src float32, dst uint8, 8-byte stores; as ``_q7``)."""
    sig = _types.void(src, _types.int64, _types.int64, dst, _types.int64, _types.int64, _types.float32,
                      _types.float32)

    def codegen(context, builder, signature, args):
        sp = context.make_array(signature.args[0])(context, builder, args[0]).data
        dp = builder.bitcast(context.make_array(signature.args[3])(context, builder, args[3]).data, _I8.as_pointer())
        _, so, ss, _, do, ds, inv_sv, zpv = args
        v1 = _ir.FunctionType(_V8F, [_V8F])
        v2 = _ir.FunctionType(_V8F, [_V8F, _V8F])
        rint = _cgutils.get_or_insert_function(builder.module, v1, "llvm.rint.v8f32")
        vmax = _cgutils.get_or_insert_function(builder.module, v2, "llvm.maxnum.v8f32")
        vmin = _cgutils.get_or_insert_function(builder.module, v2, "llvm.minnum.v8f32")
        inv = _splat(builder, inv_sv, _V8F)
        zpb = _splat(builder, zpv, _V8F)
        lo = _ir.Constant(_V8F, [0.0] * 8)
        hi = _ir.Constant(_V8F, [float(127)] * 8)
        rows = []
        for i in range(8):
            off = builder.add(so, builder.mul(ss, _ir.Constant(_I64, i)))
            rows.append(builder.load(builder.bitcast(builder.gep(sp, [off]), _V8F.as_pointer()), align=4))
        cols = _transpose8(builder, rows)
        v8b = _ir.VectorType(_I8, 8)
        for j in range(8):
            v = builder.call(rint, [builder.fmul(cols[j], inv)])
            v = builder.call(vmin, [builder.call(vmax, [builder.fadd(v, zpb), lo]), hi])
            b = builder.trunc(builder.fptosi(v, _V8D), v8b)
            off = builder.add(do, builder.mul(ds, _ir.Constant(_I64, j)))
            builder.store(b, builder.bitcast(builder.gep(dp, [off]), v8b.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


_U7_CAP = 32767.0  # x * inv_s is capped here before the int32 convert (above: 127 after saturation, as for 32767)


def _make_q32(C: int):
    """Intrinsic ``q32xC(src, s_off, s_stride, dst, d_off, inv_s, zp)`` (C = 8 or 16 input channels): u7-quantize
    32 tokens x C channels into one 32-token group of the packed tile,
    ``dst.flat[d_off + c*32 + pos(t)] = clip(rint(src.flat[s_off + t*s_stride + c] * inv_s) + zp, 0, 127)``
    (src float32 token-major, dst uint8, pos as ``_QPERM``; C stores of 32 bytes).

    Quantize first, transpose bytes after: per 8 values one multiply, a cap and ``vcvtps2dq`` (round half to even,
    as torch's fake quantization) give 8 int32; ``vpackssdw`` / ``vpaddsw`` (zero point) / ``vpackuswb`` /
    ``vpminub`` pack 4 tokens into 32 bytes, clamped to [0, 127] by the saturations; a byte shuffle per 128-bit
    lane makes each dword one channel x 4 tokens, and an 8 x 8 dword transpose (rows taken in the ``_QPERM``
    order) gives each channel's 32 bytes. About 0.9 instructions per value, against about 2 when every 8 x 8
    float block was transposed first and quantized after (``tr8q``). C = 16 reads whole 64-byte lines of the 32
    token rows: with K = 1536 / 3072 the rows (6 / 12 KB apart) fall into 1-2 L1 sets, and a half line left for a
    second 8-channel pass was evicted before it (measured 2x slower; software prefetch of the next line did not
    help). NaN gives 0."""

    @_intrinsic
    def q32(typingctx, src, s_off, s_stride, dst, d_off, inv_s, zp):
        sig = _types.void(src, _types.int64, _types.int64, dst, _types.int64, _types.float32, _types.int64)

        def codegen(context, builder, signature, args):
            sp = context.make_array(signature.args[0])(context, builder, args[0]).data
            dp = builder.bitcast(context.make_array(signature.args[3])(context, builder, args[3]).data,
                                 _I8.as_pointer())
            _, so, ss, _, do, inv_sv, zpv = args
            mod = builder.module
            fn = _cgutils.get_or_insert_function
            minps = fn(mod, _ir.FunctionType(_V8F, [_V8F, _V8F]), "llvm.x86.avx.min.ps.256")
            cvt = fn(mod, _ir.FunctionType(_V8D, [_V8F]), "llvm.x86.avx.cvt.ps2dq.256")
            packssdw = fn(mod, _ir.FunctionType(_V16W, [_V8D, _V8D]), "llvm.x86.avx2.packssdw")
            packuswb = fn(mod, _ir.FunctionType(_V32B, [_V16W, _V16W]), "llvm.x86.avx2.packuswb")
            addsat = fn(mod, _ir.FunctionType(_V16W, [_V16W, _V16W]), "llvm.sadd.sat.v16i16")
            umin = fn(mod, _ir.FunctionType(_V32B, [_V32B, _V32B]), "llvm.umin.v32i8")
            inv = _splat(builder, inv_sv, _V8F)
            cap = _ir.Constant(_V8F, [_U7_CAP] * 8)
            zp16 = _splat(builder, builder.trunc(zpv, _I16), _V16W)
            q127 = _ir.Constant(_V32B, [127] * 32)
            # byte (token i, channel c) of a lane of vpackuswb's result sits at 4 i + c; put it at 4 c + i
            bmask = _mask([lane * 16 + 4 * i + c for lane in range(2) for c in range(4) for i in range(4)])
            order = [2 * _QPERM[p // 2] + p % 2 for p in range(8)]  # dword p of a channel: token quad order[p]

            def token(t, h):  # channels 8h .. 8h+7 of token t, as int32 (x86 minps(cap, NaN) is NaN -> 0)
                off = builder.add(so, builder.add(builder.mul(ss, _ir.Constant(_I64, t)), _ir.Constant(_I64, 8 * h)))
                v = builder.load(builder.bitcast(builder.gep(sp, [off]), _V8F.as_pointer()), align=4)
                return builder.call(cvt, [builder.call(minps, [cap, builder.fmul(v, inv)])])

            quads = [[] for _ in range(C // 8)]
            for j in range(8):  # tokens 4j .. 4j+3
                rows = [[token(4 * j + i, h) for h in range(C // 8)] for i in range(4)]
                for h in range(C // 8):
                    a, b, c, d = (rows[i][h] for i in range(4))
                    ab = builder.call(addsat, [builder.call(packssdw, [a, b]), zp16])
                    cd = builder.call(addsat, [builder.call(packssdw, [c, d]), zp16])
                    v = builder.call(umin, [builder.call(packuswb, [ab, cd]), q127])
                    v = builder.shuffle_vector(v, v, bmask)
                    quads[h].append(builder.bitcast(v, _V8F))  # dword c = channel 8h + c x 4 tokens (bits only)
            for h in range(C // 8):
                cols = _transpose8(builder, [quads[h][order[p]] for p in range(8)])
                for c in range(8):
                    ptr = builder.gep(dp, [builder.add(do, _ir.Constant(_I64, 32 * (8 * h + c)))])
                    builder.store(builder.bitcast(cols[c], _V32B), builder.bitcast(ptr, _V32B.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return q32


def _python_q32(C: int):
    """Pure-Python twin of ``_make_q32`` (NUMBA_DISABLE_JIT=1)."""

    def q32(src, s_off, s_stride, dst, d_off, inv_s, zp):
        sf, df = src.reshape(-1), dst.reshape(-1)
        for t in range(32):
            for c in range(C):
                df[d_off + c * 32 + _QPOS[t]] = _q7(sf[s_off + t * s_stride + c], inv_s, zp)

    return q32


if _numba_config.DISABLE_JIT:
    _make_q32 = _python_q32  # noqa: F811

q32x8 = _make_q32(8)
q32x16 = _make_q32(16)


def _python_tr8q(src, s_off, s_stride, dst, d_off, d_stride, inv_s, zp):
    sf, df = src.reshape(-1), dst.reshape(-1)
    for i in range(8):
        for j in range(8):
            df[d_off + j * d_stride + i] = _q7(sf[s_off + i * s_stride + j], inv_s, zp)


if _numba_config.DISABLE_JIT:
    tr8q = _python_tr8q  # noqa: F811


@_intrinsic
def vminmax8(typingctx, src, n_vec, res):
    """res[0:8] = lane-wise min, res[8:16] = lane-wise max over the first ``n_vec`` 8-float vectors of src
    (float32, n_vec >= 1): vminps / vmaxps, which a numba loop does not emit (it keeps NaN-aware branches);
    res[16] = 1.0 if an element is NaN or inf (an integer test of the exponent bits: numba's IR builder puts
    fast-math flags on float ops, under which a float test could be folded away), else 0."""
    sig = _types.void(src, _types.int64, res)

    def codegen(context, builder, signature, args):
        sp = context.make_array(signature.args[0])(context, builder, args[0]).data
        rp = context.make_array(signature.args[2])(context, builder, args[2]).data
        nv = args[1]
        v2 = _ir.FunctionType(_V8F, [_V8F, _V8F])
        vmin = _cgutils.get_or_insert_function(builder.module, v2, "llvm.minnum.v8f32")
        vmax = _cgutils.get_or_insert_function(builder.module, v2, "llvm.maxnum.v8f32")
        first = builder.load(builder.bitcast(sp, _V8F.as_pointer()), align=4)
        expo = _ir.Constant(_V8D, [0x7F800000] * 8)

        def nonfinite(v):
            bits = builder.and_(builder.bitcast(v, _V8D), expo)
            return builder.zext(builder.icmp_unsigned("==", bits, expo), _V8D)

        z0 = nonfinite(first)
        loop = loop_open(builder, "mm", _ir.Constant(_I64, 1), nv, [first, first, z0])
        i, (lo, hi, z) = loop.index, loop.carried
        ptr = builder.gep(sp, [builder.mul(i, _ir.Constant(_I64, 8))])
        v = builder.load(builder.bitcast(ptr, _V8F.as_pointer()), align=4)
        lo2 = builder.call(vmin, [lo, v])
        hi2 = builder.call(vmax, [hi, v])
        z2 = builder.or_(z, nonfinite(v))
        loop_close(builder, loop, [lo2, hi2, z2])
        zs = builder.extract_element(z, _ir.Constant(_I32, 0))
        for j in range(1, 8):
            zs = builder.or_(zs, builder.extract_element(z, _ir.Constant(_I32, j)))
        builder.store(builder.uitofp(zs, _ir.FloatType()), builder.gep(rp, [_ir.Constant(_I64, 16)]))
        builder.store(lo, builder.bitcast(rp, _V8F.as_pointer()), align=4)
        builder.store(hi, builder.bitcast(builder.gep(rp, [_ir.Constant(_I64, 8)]), _V8F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _python_vminmax8(src, n_vec, res):
    v = src.reshape(-1)[:8 * n_vec].reshape(n_vec, 8)
    res[:8] = v.min(axis=0)
    res[8:16] = v.max(axis=0)
    res[16] = float(not np.isfinite(v).all())


if _numba_config.DISABLE_JIT:
    vminmax8 = _python_vminmax8  # noqa: F811


@njit(**_OPTS)
def qparams(x, wscales, rowsum, qmax, cscales, init, res):
    """Dynamic u7 parameters of x, (scale, zero point), from min(x, 0) / max(x, 0) over its whole 8-float
    vectors (the caller checks the tail and ``res[16] == 0``: no NaN / inf), and in place ``cscales = scale *
    wscales``, ``init = -zp * rowsum`` (the per-call vectors of the avx2 kernel)."""
    f = x.reshape(-1)
    n = f.shape[0]
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    n8 = n // 8
    res[16] = 0.0
    if n8 > 0:
        vminmax8(f, n8, res)
        for j in range(8):
            lo = min(lo, res[j])
            hi = max(hi, res[8 + j])
    for i in range(8 * n8, n):
        lo = min(lo, f[i])
        hi = max(hi, f[i])
    return _finish_qparams(lo, hi, qmax, wscales, rowsum, cscales, init)


@njit(**_OPTS)
def _finish_qparams(lo, hi, qmax, wscales, rowsum, cscales, init):
    """(scale, zero point) from min(x, 0) / max(x, 0), and ``cscales = scale * wscales``, ``init = -zp * rowsum``."""
    lo64 = np.float64(lo)
    hi64 = np.float64(hi)
    scale = np.float64(np.float32((hi64 - lo64) / qmax)) if hi64 > lo64 else 1.0
    zp = int(min(max(np.round(-lo64 / scale), 0.0), float(qmax)))
    for o in range(wscales.shape[0]):
        cscales[o] = np.float32(scale) * wscales[o]
        init[o] = np.int32(-zp * rowsum[o])
    return scale, zp


@njit(parallel=True, **_OPTS)
def qparams_parallel(x, wscales, rowsum, qmax, cscales, init, res):
    """``qparams`` with the min / max pass split over ``res.shape[0]`` workers (each its own row of res, 24
    floats); the combination, the tail and the per-channel vectors as in qparams. res[0, 16] = 1.0 if an element
    of the whole 8-float vectors is NaN or inf."""
    f = x.reshape(-1)
    n = f.shape[0]
    n8 = n // 8
    nw = res.shape[0]
    for w in prange(nw):
        a = w * n8 // nw
        b = (w + 1) * n8 // nw
        r = res[w]
        r[16] = 0.0
        for j in range(16):
            r[j] = 0.0
        if b > a:
            vminmax8(f[8 * a:], b - a, r)
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    bad = 0.0
    for w in range(nw):
        bad = max(bad, res[w, 16])
        for j in range(8):
            lo = min(lo, res[w, j])
            hi = max(hi, res[w, 8 + j])
    res[0, 16] = bad
    for i in range(8 * n8, n):
        lo = min(lo, f[i])
        hi = max(hi, f[i])
    return _finish_qparams(lo, hi, qmax, wscales, rowsum, cscales, init)


# ------------------------------------------------------------------------------------------ helpers
@njit(inline="always", **_OPTS)
def _q7(v, inv_s, zp):
    """u7 of one value: ``clip(rint(v * inv_s) + zp, 0, 127)`` (round half to even; NaN -> 0), as ``q32x8``."""
    y = v * inv_s
    if not y >= np.float32(-32768.0):  # also NaN
        return np.uint8(0)
    q = np.rint(min(y, np.float32(_U7_CAP))) + np.float32(zp)
    return np.uint8(min(max(q, np.float32(0.0)), np.float32(127.0)))


@njit(**_OPTS)
def pack_tile_u8(x, t0, tn, inv_s, zp, xt):
    """The portable path's tile, channel-major: xt[k, t] = u7(x[t0 + t, k]) for t < tn, zero-point for the
    padding tokens. x float32 (tokens, K), xt uint8 (>= K, 64)."""
    K = x.shape[1]
    tf = tn - tn % 8
    kf = K - K % 8
    zq = np.uint8(zp)
    zf = np.float32(zp)
    for tb in range(0, T, 8):
        if tb < tf:
            for kb in range(0, kf, 8):
                tr8q(x, (t0 + tb) * K + kb, K, xt, kb * T + tb, T, inv_s, zf)
            for k in range(kf, K):
                for i in range(8):
                    xt[k, tb + i] = _q7(x[t0 + tb + i, k], inv_s, zp)
        else:
            for k in range(K):
                for i in range(8):
                    t = tb + i
                    xt[k, t] = _q7(x[t0 + t, k], inv_s, zp) if t < tn else zq


@njit(**_OPTS)
def pack_tile_u7g(x, t0, tn, inv_s, zp, xg):
    """The avx2 kernel's tile, **group-major**: ``xg.flat[g*K*32 + k*32 + pos(t)] = u7(x[t0 + 32 g + t, k])`` for
    the 32-token groups g that hold tokens (t < tn; zero point for the padding tokens of the last group), pos
    swapping the middle quarters of the group (see the module docstring). A 16-token slab then reads 32 bytes per
    input channel from ``K x 32 B`` (12 KB at K = 384, 24 KB at K = 768), where the channel-major ``xt[k, 0:64]``
    spread the same reads over ``K x 64 B`` of cache lines. Full groups go through ``q32x16`` / ``q32x8``."""
    K = x.shape[1]
    kf = K - K % 8
    zq = np.uint8(zp)
    flat = xg.reshape(-1)
    n_groups = (tn + G32 - 1) // G32
    for g in range(n_groups):
        gbase = g * K * G32
        tg = g * G32
        if tg + G32 <= tn:
            k16 = K - K % 16
            for kb in range(0, k16, 16):
                q32x16(x, (t0 + tg) * K + kb, K, flat, gbase + kb * G32, inv_s, zp)
            if k16 < kf:
                q32x8(x, (t0 + tg) * K + k16, K, flat, gbase + k16 * G32, inv_s, zp)
            for k in range(kf, K):
                for t in range(G32):
                    flat[gbase + k * G32 + _QPOS[t]] = _q7(x[t0 + tg + t, k], inv_s, zp)
            continue
        for t in range(G32):  # the last, partial group
            pos = gbase + _QPOS[t]
            if tg + t < tn:
                xr = x[t0 + tg + t]
                for k in range(K):
                    flat[pos + k * G32] = _q7(xr[k], inv_s, zp)
            else:
                for k in range(K):
                    flat[pos + k * G32] = zq


@njit(**_OPTS)
def init_rows(iacc, nrows, r0, rowsum, zp):
    """iacc[i, :] = -zp * rowsum[r0 + i]: the zero-point correction, so that the int32 accumulator ends as
    sum_k Wq[o, k] * (Xq[t, k] - zp). |zp * rowsum| < 2**31 for in_features < 2**31 / (2 * 127 * 128) = 66k."""
    for i in range(nrows):
        v = np.int32(-np.int64(zp) * np.int64(rowsum[r0 + i]))
        ia = iacc[i]
        for t in range(T):
            ia[t] = v


@njit(**_OPTS)
def to_float(iacc, facc, nrows):
    """facc = float32(iacc) (vectorized int32 -> float32 converts)."""
    for i in range(nrows):
        ia = iacc[i]
        fa = facc[i]
        for t in range(T):
            fa[t] = np.float32(ia[t])


@njit(**_OPTS)
def task_range(task, M, nbr, chunk):
    """(t0, tn, b0, b1): the token tile and block rows of a task."""
    n_chunks = (nbr + chunk - 1) // chunk
    tile = task // n_chunks
    ch = task - tile * n_chunks
    t0 = tile * T
    b0 = ch * chunk
    return t0, min(T, M - t0), b0, min(nbr, b0 + chunk)


@njit(**_OPTS)
def run_task_i8_portable(task, x, inv_s, zp, indptr, indices, data, rowsum, cscales, bias, residual, out, flags,
                         chunk, xt, iacc, facc):
    """The same task for any block shape with a plain int32 loop (no intrinsics)."""
    br = data.shape[1]
    bc = data.shape[2]
    t0, tn, b0, b1 = task_range(task, x.shape[0], indptr.shape[0] - 1, chunk)
    pack_tile_u8(x, t0, tn, inv_s, zp, xt)
    sub = iacc.shape[0] // br
    for s0 in range(b0, b1, sub):
        s1 = min(b1, s0 + sub)
        nrows = (s1 - s0) * br
        init_rows(iacc, nrows, s0 * br, rowsum, zp)
        for b in range(s0, s1):
            a_row = (b - s0) * br
            for p in range(indptr[b], indptr[b + 1]):
                c0 = indices[p] * bc
                for r in range(br):
                    a = iacc[a_row + r]
                    for j in range(bc):
                        w = np.int32(data[p, r, j])
                        xr = xt[c0 + j]
                        for t in range(T):
                            a[t] += w * np.int32(xr[t])
        to_float(iacc, facc, nrows)
        epilogue(facc, nrows, s0 * br, t0, tn, cscales, bias, residual, out, flags)


@njit(parallel=True, **_OPTS)
def spmm_i8_portable(x, inv_s, zp, indptr, indices, data, rowsum, cscales, bias, residual, out, flags, chunk,
                     n_tasks, xt_ws, iacc_ws, facc_ws):
    """Portable int8 x int8 -> int32 (no AVX2 intrinsics), any block shape. cscales = s_x * weight scales."""
    n_workers = xt_ws.shape[0]
    for w in prange(n_workers):
        for task in range(w, n_tasks, n_workers):
            run_task_i8_portable(task, x, inv_s, zp, indptr, indices, data, rowsum, cscales, bias, residual,
                                 out, flags, chunk, xt_ws[w], iacc_ws[w], facc_ws[w])


@njit(**_OPTS)
def run_task_i8_direct(task, x, inv_s, zp, qptr, qidx, qw, br, init, cscales, bias, residual, out, mode, chunk, sub,
                       xt):
    """One (token tile, chunk of block rows) task of the avx2 kernel finished in registers: the tile is packed
    (u7) once (64 tokens x K bytes: every slab reads the same cache lines), then per sub-chunk of ``sub`` block
    rows (their quads reused from L1 by the 4 slabs), per 16-token slab, per block row, the quad micro-kernel
    dequantizes, applies GELU / residual and stores into ``out``. Slabs outside the block-row loop: consecutive
    calls fill adjacent 16-byte pieces of the same 16 rows of ``out`` (block rows outside touched 64 rows of
    ``out`` per block row: measured 1.10-1.2x slower at out = 1536-3072 wide)."""
    t0, tn, b0, b1 = task_range(task, x.shape[0], qptr.shape[0] - 1, chunk)
    pack_tile_u7g(x, t0, tn, inv_s, zp, xt)
    N = out.shape[1]
    K = x.shape[1]
    for s0 in range(b0, b1, sub):
        s1 = min(b1, s0 + sub)
        for ts in range(0, tn, 16):  # slabs past the last token are skipped
            nv = min(S16, tn - ts)
            o_base = (t0 + ts) * N
            hi = (ts >> 4) & 1
            x_off = (ts >> 5) * K * G32  # the slab's 32-token group in the packed tile
            for b in range(s0, s1):
                q0 = qptr[b]
                q1 = qptr[b + 1]
                for rs in range(0, br, 4):
                    o0 = b * br + rs
                    if hi == 0:
                        mkd8_lo(xt, qidx, qw, q0, q1, x_off, rs * 4, br * 4, init, cscales, bias, o0, out,
                                o_base + o0, N, nv, residual, mode)
                    else:
                        mkd8_hi(xt, qidx, qw, q0, q1, x_off, rs * 4, br * 4, init, cscales, bias, o0, out,
                                o_base + o0, N, nv, residual, mode)


@njit(parallel=True, **_OPTS)
def spmm_i8_direct(x, inv_s, zp, qptr, qidx, qw, br, init, cscales, bias, residual, out, mode, chunk, sub, n_tasks,
                   xt_ws, counter):
    """AVX2 int8 x int8 -> int32 over the quad layout ((4k)x1 blocks), finished in registers (no float
    accumulator or epilogue pass). init = -zp * row sums of Wq (int32), cscales = s_x * weight scales, bias float32
    (out_features,) (zeros if none); mode = GELU | 2 * residual; tasks handed out dynamically through ``counter``
    (0 on entry)."""
    n_workers = xt_ws.shape[0]
    for w in prange(n_workers):
        task = fetch_add(counter, 1)
        while task < n_tasks:
            run_task_i8_direct(task, x, inv_s, zp, qptr, qidx, qw, br, init, cscales, bias, residual, out, mode,
                               chunk, sub, xt_ws[w])
            task = fetch_add(counter, 1)


@njit(**_OPTS)
def spmm_i8_direct_serial(x, inv_s, zp, qptr, qidx, qw, br, init, cscales, bias, residual, out, mode, chunk,
                          sub, n_tasks, xt_ws, counter):
    """spmm_i8_direct on the calling thread (one worker: no parallel launch)."""
    for task in range(n_tasks):
        run_task_i8_direct(task, x, inv_s, zp, qptr, qidx, qw, br, init, cscales, bias, residual, out, mode, chunk,
                           sub, xt_ws[0])
