"""sparsify.kernels.int8: int8 x int8 -> int32 SpMM against naive float64 references.

Error bounds (u7 activations, per-tensor scale s_x; W the dequantized int8 weight):

* against the quantized reference (``reference_spmm_int8``: u7-dequantized x times W in float64): float32
  rounding only, ``|y - ref_q| <= 1e-5 * (1 + |x_q| |W|^T)``;
* against the float reference on the exact x: ``|y - ref| <= g * (0.5 * s_x * (1 + 1e-3)) * sum_k |W[o, k]|``
  plus the float32 term, where ``g = 1.13`` (GELU's Lipschitz constant) with ``activation="gelu"``, else 1;
* ``vpmaddubsw`` never saturates: the extreme case (all activations 127, all weights -128 / +127) is exact.

Both backends (``avx2`` intrinsics and the portable loop) compute the same int32 sums (results equal up to one
float32 rounding in the dequantization).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sparsify.kernels.format import BlockSparseMatrix
from sparsify.kernels.int8 import (
    has_avx2,
    int8_backend,
    quantize_activations,
    reference_spmm_int8,
    spmm_int8,
)
from sparsify.kernels.spmm import reference_spmm

BLOCKS = [(4, 1), (8, 1), (16, 1), (1, 1), (1, 4), (2, 2)]
DENSITIES = [0.0, 0.05, 0.5, 1.0]
TOKENS = [1, 63, 130]
BACKENDS = ["portable"] + (["avx2"] if has_avx2() else [])
needs_avx2 = pytest.mark.skipif(not has_avx2(), reason="CPU without AVX2")


def random_block_weight(rng, n_out, n_in, block, density):
    br, bc = block
    keep = rng.random((n_out // br, n_in // bc)) < density
    if density >= 1.0:
        keep[:] = True
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    w *= np.repeat(np.repeat(keep, br, axis=0), bc, axis=1)
    return w


def check(y, x, m, act=None, res=None, **q):
    """Both bounds of the module docstring."""
    wd = m.to_dense().astype(np.float64) if m.dtype == np.int8 else m.quantize().to_dense().astype(np.float64)
    xq, s, zp = quantize_activations(x, q.get("x_scale"), q.get("x_zero_point"))
    xd = s * (xq.astype(np.float64) - zp)
    fp_term = 1e-5 * (1.0 + np.abs(xd) @ np.abs(wd).T)
    ref_q = reference_spmm_int8(x, m, activation=act, residual=res, **q)
    err_q = np.abs(y.astype(np.float64) - ref_q)
    assert y.dtype == np.float32
    assert np.all(err_q <= fp_term), f"vs quantized reference: max err {err_q.max():.3g}"
    if not q:  # dynamic quantization: x is inside the quantized range
        g = 1.13 if act == "gelu" else 1.0
        bound = g * 0.5 * s * (1 + 1e-3) * np.abs(wd).sum(axis=1)[None, :] + fp_term
        ref = reference_spmm(x, m if m.dtype == np.int8 else m.quantize(), activation=act, residual=res)
        err = np.abs(y.astype(np.float64) - ref)
        assert np.all(err <= bound), f"vs float reference: worst ratio {(err / bound).max():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", BLOCKS)
def test_int8_grid(block, backend):
    if backend == "avx2" and not (block[1] == 1 and block[0] % 4 == 0):
        pytest.skip("the avx2 kernel takes (4k)x1 blocks")
    rng = np.random.default_rng(sum(block) * 11 + len(backend))
    n_out, n_in = 48, 40
    for density in DENSITIES:
        w = random_block_weight(rng, n_out, n_in, block, density)
        bias = rng.standard_normal(n_out).astype(np.float32)
        m = BlockSparseMatrix.from_dense(w, block, bias=bias if density != 0.5 else None, dtype="int8")
        for tokens in TOKENS:
            x = rng.standard_normal((tokens, n_in)).astype(np.float32)
            for act, use_res in ((None, False), ("gelu", False), (None, True), ("gelu", True)):
                res = rng.standard_normal((tokens, n_out)).astype(np.float32) if use_res else None
                y = spmm_int8(x, m, activation=act, residual=res, backend=backend)
                check(y, x, m, act, res)


@needs_avx2
@pytest.mark.parametrize("quad_bytes", [64, 16 * 1024])
def test_avx2_sub_chunks_of_block_rows(monkeypatch, quad_bytes):
    """The avx2 kernel walks sub-chunks of block rows (slabs outside them): tiny sub-chunks (one or two block
    rows) and one large one give the same result as the reference, 8x1 blocks, GELU + residual, 1 and 2 threads."""
    from sparsify.kernels import int8 as int8_module

    monkeypatch.setattr(int8_module, "_QUAD_BYTES", quad_bytes)
    rng = np.random.default_rng(8)
    for shape, block, tokens in [((96, 200), (4, 1), 70), ((64, 384), (8, 1), 130)]:
        w = random_block_weight(rng, *shape, block, 0.2)
        m = BlockSparseMatrix.from_dense(w, block, bias=rng.standard_normal(shape[0]).astype(np.float32),
                                         dtype="int8")
        x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
        res = rng.standard_normal((tokens, shape[0])).astype(np.float32)
        ref = reference_spmm_int8(x, m, activation="gelu", residual=res)
        for threads in (1, 2):
            y = spmm_int8(x, m, activation="gelu", residual=res, threads=threads, backend="avx2")
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * (1.0 + float(np.abs(ref).max())))


@needs_avx2
@pytest.mark.parametrize("shape, tokens", [((64, 1100), 70), ((768, 96), 200), ((32, 3072), 5)])
def test_backends_bit_identical_and_threads(shape, tokens):
    """Large K (no panels needed: a u8 tile of 3072 x 64 is 192 KB), many rows (several accumulator sub-chunks),
    a ragged last tile; avx2 == portable up to one float32 rounding, 1 thread == 2 threads bit for bit."""
    rng = np.random.default_rng(7)
    w = random_block_weight(rng, *shape, (4, 1), 0.2)
    m = BlockSparseMatrix.from_dense(w, (4, 1), bias=rng.standard_normal(shape[0]).astype(np.float32), dtype="int8")
    x = (rng.standard_normal((tokens, shape[1])) + 0.5).astype(np.float32)
    y = spmm_int8(x, m, activation="gelu", backend="avx2")
    check(y, x, m, "gelu")
    # same int32 sums; the float epilogue may differ by an FMA contraction (one rounding)
    np.testing.assert_allclose(y, spmm_int8(x, m, activation="gelu", backend="portable"), rtol=1e-6,
                               atol=1e-6 * float(np.abs(y).max()))
    np.testing.assert_array_equal(spmm_int8(x, m, threads=1), spmm_int8(x, m, threads=2 if os.cpu_count() > 1 else 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_saturation_extremes(backend):
    """All activations at 127 and weights at -128 / +127: the int16 pairs of vpmaddubsw reach +-32512 (< 32767)
    and the result is exact."""
    n_out, n_in = 8, 64
    data = np.full((n_in * n_out // 4, 4, 1), -128, np.int8)
    data[1::2] = 127
    indptr = np.arange(0, n_in * (n_out // 4) + 1, n_in)
    indices = np.tile(np.arange(n_in), n_out // 4)
    m = BlockSparseMatrix((n_out, n_in), (4, 1), indptr, indices, data, scales=np.ones(n_out, np.float32))
    x = np.full((3, n_in), 127.0, np.float32)
    y = spmm_int8(x, m, x_scale=1.0, x_zero_point=0, backend=backend)
    expected = 127.0 * (32 * -128 + 32 * 127)  # blocks alternate -128 / 127 along k
    np.testing.assert_array_equal(y, np.full((3, n_out), expected, np.float32))
    data = np.full_like(data, -128)
    m = BlockSparseMatrix((n_out, n_in), (4, 1), indptr, indices, data, scales=np.ones(n_out, np.float32))
    y = spmm_int8(x, m, x_scale=1.0, x_zero_point=0, backend=backend)
    np.testing.assert_array_equal(y, np.full((3, n_out), 127.0 * -128 * n_in, np.float32))


def test_static_scale_clips_and_float_weights_are_quantized():
    rng = np.random.default_rng(2)
    w = random_block_weight(rng, 16, 24, (4, 1), 0.5)
    m = BlockSparseMatrix.from_dense(w, (4, 1), bias=rng.standard_normal(16).astype(np.float32))
    x = (3 * rng.standard_normal((9, 24))).astype(np.float32)
    q = dict(x_scale=0.02, x_zero_point=60)  # range [-1.2, 1.34]: most of x is clipped
    y = spmm_int8(x, m, **q)
    check(y, x, m, **q)
    xq, s, zp = quantize_activations(x, **{"scale": 0.02, "zero_point": 60})
    assert xq.dtype == np.uint8 and xq.max() == 127 and xq.min() == 0 and (s, zp) == (np.float32(0.02).item(), 60)
    assert "int8x8" in m._cache  # the float32 matrix was quantized once and cached
    np.testing.assert_array_equal(spmm_int8(x, m, **q), y)


def test_empty_rows_all_zero_and_zero_tokens():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    w[4:12] = 0.0
    bias = rng.standard_normal(16).astype(np.float32)
    m = BlockSparseMatrix.from_dense(w, (4, 1), bias=bias, dtype="int8")
    x = rng.standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(spmm_int8(x, m)[:, 4:12], np.broadcast_to(bias[4:12], (5, 8)), rtol=0, atol=0)
    z = BlockSparseMatrix.from_dense(np.zeros((16, 8), np.float32), (4, 1), dtype="int8")
    np.testing.assert_array_equal(spmm_int8(x, z), np.zeros((5, 16), np.float32))
    np.testing.assert_array_equal(spmm_int8(np.zeros((5, 8), np.float32), m), np.broadcast_to(bias, (5, 16)))
    assert spmm_int8(np.zeros((0, 8), np.float32), m).shape == (0, 16)


def test_inplace_residual():
    rng = np.random.default_rng(5)
    m = BlockSparseMatrix.from_dense(random_block_weight(rng, 64, 32, (4, 1), 0.4), (4, 1), dtype="int8")
    x = rng.standard_normal((70, 32)).astype(np.float32)
    res = rng.standard_normal((70, 64)).astype(np.float32)
    expected = spmm_int8(x, m, residual=res)
    out = res.copy()
    assert spmm_int8(x, m, residual=out, out=out) is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=np.ones((3, 32), np.float64)), "float32"),
        (dict(x=np.ones((3, 31), np.float32)), "in_features"),
        (dict(x=np.ones((32, 3), np.float32).T), "C-contiguous"),
        (dict(activation="relu"), "activation"),
        (dict(residual=np.ones((3, 63), np.float32)), "residual must have shape"),
        (dict(backend="sse"), "backend"),
        (dict(x_scale=0.1), "both"),
        (dict(x_scale=-1.0, x_zero_point=0), "positive"),
        (dict(x_scale=0.1, x_zero_point=128), "zero_point"),
        (dict(x_scale=0.1, x_zero_point=1.5), "zero_point"),
        (dict(x=np.full((3, 32), np.nan, np.float32)), "NaN"),
        (dict(w=np.ones((64, 32), np.float32)), "BlockSparseMatrix"),
    ],
)
def test_int8_bad_input(kwargs, message):
    w = BlockSparseMatrix.from_dense(np.ones((64, 32), np.float32), (4, 1), dtype="int8")
    args = dict(x=np.ones((3, 32), np.float32), w=w)
    args.update(kwargs)
    x, w = args.pop("x"), args.pop("w")
    with pytest.raises(ValueError, match=message):
        spmm_int8(x, w, **args)


def test_backend_selection():
    m22 = BlockSparseMatrix.from_dense(np.ones((8, 8), np.float32), (2, 2), dtype="int8")
    m41 = BlockSparseMatrix.from_dense(np.ones((8, 8), np.float32), (4, 1), dtype="int8")
    assert int8_backend(m22) == "portable"
    assert int8_backend(m41) == ("avx2" if has_avx2() else "portable")
    assert int8_backend(m41, "portable") == "portable"
    with pytest.raises(ValueError, match="4k"):
        int8_backend(m22, "avx2")


def test_property_random_problems_int8():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(
        block=st.sampled_from(BLOCKS),
        n_out_blocks=st.integers(1, 5),
        n_in_blocks=st.integers(1, 12),
        tokens=st.integers(1, 140),
        density=st.floats(0.0, 1.0),
        act=st.sampled_from([None, "gelu"]),
        backend=st.sampled_from(BACKENDS),
        shift=st.floats(-2.0, 2.0),
        seed=st.integers(0, 2**16),
    )
    def run(block, n_out_blocks, n_in_blocks, tokens, density, act, backend, shift, seed):
        if backend == "avx2" and not (block[1] == 1 and block[0] % 4 == 0):
            backend = "portable"
        rng = np.random.default_rng(seed)
        n_out, n_in = n_out_blocks * block[0], n_in_blocks * block[1]
        w = random_block_weight(rng, n_out, n_in, block, density)
        m = BlockSparseMatrix.from_dense(w, block, bias=rng.standard_normal(n_out).astype(np.float32), dtype="int8")
        x = (rng.standard_normal((tokens, n_in)) + shift).astype(np.float32)
        check(spmm_int8(x, m, activation=act, backend=backend), x, m, act)

    run()


def test_int8_python_fallback_with_jit_disabled():
    """The int8 kernel bodies (intrinsic twins included) run as plain Python under NUMBA_DISABLE_JIT=1."""
    code = """
import numpy as np
from sparsify.kernels.format import BlockSparseMatrix
from sparsify.kernels.int8 import spmm_int8, reference_spmm_int8
rng = np.random.default_rng(0)
worst = 0.0
for blk, be in [((4, 1), "avx2"), ((8, 1), "avx2"), ((2, 2), "portable")]:
    w = rng.standard_normal((16, 24)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    m = BlockSparseMatrix.from_dense(w, blk, bias=rng.standard_normal(16).astype(np.float32), dtype="int8")
    x = rng.standard_normal((37, 24)).astype(np.float32)
    r = rng.standard_normal((37, 16)).astype(np.float32)
    y = spmm_int8(x, m, activation="gelu", residual=r, backend=be)
    worst = max(worst, float(np.abs(y - reference_spmm_int8(x, m, activation="gelu", residual=r)).max()))
print(worst)
"""
    if not has_avx2():
        pytest.skip("the avx2 twin is selected only where the CPU has AVX2")
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1e-4


@pytest.mark.parametrize("where", [0, 17, 98])  # a full 8-float vector, the middle, the ragged tail
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_activations_rejected(where, bad):
    w = BlockSparseMatrix.from_dense(np.ones((8, 33), np.float32), (4, 1), dtype="int8")
    x = np.ones((3, 33), np.float32)
    x.reshape(-1)[where] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        spmm_int8(x, w)


@pytest.mark.parametrize("tokens, n_in", [(64, 40), (40, 21), (1, 8), (96, 384)])
def test_packed_tiles_equal_quantize_activations(tokens, n_in):
    """Both packers (the avx2 kernel's group-major ``pack_tile_u7g`` with its ``q32x8`` vector path, and the
    portable ``pack_tile_u8``) write exactly ``quantize_activations``: ties x = (n + 1/2) * s round half to even,
    values past the u7 range (and past int16 / int32 after scaling) clip, NaN gives 0, odd channel counts and
    partial 32-token groups take the scalar path, padding tokens hold the zero point."""
    from sparsify.kernels import _jit_int8 as J

    rng = np.random.default_rng(11)
    s, zp = 0.25, 60
    x = (rng.integers(-300, 300, (tokens, n_in)) * (s / 2)).astype(np.float32)  # half of the values are ties
    x.flat[:: 7] = rng.standard_normal(x.size)[:: 7].astype(np.float32) * 40
    x.flat[3:: 29] = np.float32(1e12)
    x.flat[5:: 31] = np.float32(-1e12)
    x.flat[9:: 37] = np.nan
    x.flat[1:3], x.flat[4] = (np.float32(1e12), np.float32(-1e12)), np.nan
    expected, _, _ = quantize_activations(x, s, zp)
    assert expected[np.isnan(x)].max() == 0 and set(np.unique(expected[x == 1e12])) == {127}
    inv_s = np.float32(1.0 / s)
    pos = np.array([J._QPERM[t // 8] * 8 + t % 8 for t in range(32)])
    for t0 in range(0, tokens, 64):
        tn = min(64, tokens - t0)
        xg = np.full((n_in, 64), 255, np.uint8)
        J.pack_tile_u7g(x, t0, tn, inv_s, zp, xg)
        flat = xg.reshape(-1)
        for t in range(-(-tn // 32) * 32):
            got = flat[(t // 32) * n_in * 32 + np.arange(n_in) * 32 + pos[t % 32]]
            np.testing.assert_array_equal(got, expected[t0 + t] if t < tn else np.full(n_in, zp, np.uint8))
        xt = np.full((n_in, 64), 255, np.uint8)
        J.pack_tile_u8(x, t0, tn, inv_s, zp, xt)
        np.testing.assert_array_equal(xt[:, :tn], expected[t0:t0 + tn].T)
        assert (xt[:, tn:] == zp).all()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores")
def test_parallel_dynamic_minmax_equals_serial_and_rejects_nan():
    """From 2**16 values on, the dynamic min / max pass is split over the workers: same scale, zero point and
    result as one thread, and a NaN / inf in either worker's share (or in the ragged tail) is still rejected."""
    rng = np.random.default_rng(12)
    m = BlockSparseMatrix.from_dense(random_block_weight(rng, 64, 261, (4, 1), 0.3), (4, 1), dtype="int8")
    x = rng.standard_normal((300, 261)).astype(np.float32)  # 78,300 values: 9,787 vectors of 8 and a tail of 4
    x[250, 7] = 9.0  # the max sits in the second worker's share
    y2 = spmm_int8(x, m, threads=2)
    np.testing.assert_array_equal(y2, spmm_int8(x, m, threads=1))
    check(y2, x, m)
    for where in (5, x.size // 2 + 3, x.size - 1):
        bad = x.copy()
        bad.flat[where] = np.inf if where % 2 else np.nan
        with pytest.raises(ValueError, match="NaN or inf"):
            spmm_int8(bad, m, threads=2)
