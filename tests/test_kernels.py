"""sparsify.kernels: block-sparse format and SpMM checked against naive float64 references.

Grid: block shapes (out x in) 1x1, 4x1, 1x4, 8x1, 16x1, 2x2, 4x4; densities 0, 0.05, 0.5, 1; token counts
1, 63 (odd, below one tile) and 130 (two tiles + a remainder); float32 and int8 weights; bias / GELU / residual
epilogues; a K large enough to need panels. Error bounds: |y - ref| <= 1e-5 * (1 + |x| |W|^T) (float32
accumulation against float64), and for int8 weights the same against the dequantized weight, plus
|W - dequant(W)| <= scale / 2 per element.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsify.kernels.format import BlockSparseMatrix, parse_block, quantize_per_channel
from sparsify.kernels.spmm import TILE_TOKENS, gelu_reference, reference_spmm, spmm

REPO = Path(__file__).resolve().parents[1]
BLOCKS = [(1, 1), (4, 1), (1, 4), (8, 1), (16, 1), (2, 2), (4, 4)]
DENSITIES = [0.0, 0.05, 0.5, 1.0]
TOKENS = [1, 63, 130]


def random_block_weight(rng, n_out, n_in, block, density):
    br, bc = block
    keep = rng.random((n_out // br, n_in // bc)) < density
    if density >= 1.0:
        keep[:] = True
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    w *= np.repeat(np.repeat(keep, br, axis=0), bc, axis=1)
    return w, keep


def assert_close(y, ref, x, w_dense):
    bound = 1e-5 * (1.0 + np.abs(x).astype(np.float64) @ np.abs(w_dense).astype(np.float64).T)
    err = np.abs(y.astype(np.float64) - ref)
    assert y.dtype == np.float32
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


# ------------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("density", DENSITIES)
def test_dense_roundtrip_and_bsr(block, density):
    rng = np.random.default_rng(hash((block, density)) % 2**32)
    w, keep = random_block_weight(rng, 32, 48, block, density)
    m = BlockSparseMatrix.from_dense(w, block)
    assert m.block == block and m.shape == (32, 48)
    np.testing.assert_array_equal(m.to_dense(), w)
    np.testing.assert_array_equal(m.block_mask(), keep & (np.abs(w).reshape(32 // block[0], block[0], -1, block[1]).sum(axis=(1, 3)) > 0))
    bsr = m.to_bsr()
    assert bsr.blocksize == block
    np.testing.assert_array_equal(bsr.toarray(), w)
    back = BlockSparseMatrix.from_bsr(bsr)
    np.testing.assert_array_equal(back.indptr, m.indptr)
    np.testing.assert_array_equal(back.indices, m.indices)
    np.testing.assert_array_equal(back.to_dense(), w)


def test_mask_elementwise_and_blockwise():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    emask = rng.random((8, 8)) < 0.3
    m = BlockSparseMatrix.from_dense(w, (4, 1), mask=emask)
    np.testing.assert_array_equal(m.to_dense(), np.where(emask, w, 0))
    bmask = np.zeros((2, 8), bool)
    bmask[0, 3] = bmask[1, 0] = True
    m = BlockSparseMatrix.from_dense(w, "4x1", mask=bmask)
    assert m.nnz_blocks == 2 and m.sparsity == pytest.approx(1 - 8 / 64)
    expected = np.zeros_like(w)
    expected[0:4, 3] = w[0:4, 3]
    expected[4:8, 0] = w[4:8, 0]
    np.testing.assert_array_equal(m.to_dense(), expected)
    # A kept all-zero block stays stored: the pattern, not the values, decides.
    z = BlockSparseMatrix.from_dense(np.zeros((8, 8), np.float32), (4, 1), mask=bmask)
    assert z.nnz_blocks == 2


def test_int8_quantization_bound():
    rng = np.random.default_rng(1)
    w, _ = random_block_weight(rng, 64, 32, (4, 1), 0.5)
    w[5] = 0.0  # an all-zero output channel
    q = BlockSparseMatrix.from_dense(w, (4, 1), dtype="int8")
    assert q.dtype == np.int8 and q.scales.shape == (64,)
    deq = q.to_dense()
    assert np.all(np.abs(deq - w) <= q.scales[:, None] / 2 + 1e-7)
    assert np.all(deq[w == 0] == 0)  # pruned weights stay exactly zero
    np.testing.assert_array_equal(BlockSparseMatrix.from_dense(w, (4, 1)).quantize().data, q.data)
    qq, s = quantize_per_channel(w)
    np.testing.assert_array_equal(s, q.scales)
    np.testing.assert_allclose(q.to_bsr().toarray(), deq)
    f = q.dequantize()  # float32, scales folded in, same blocks and bias
    assert f.dtype == np.float32 and f.scales is None and f.block == q.block
    np.testing.assert_array_equal(f.to_dense(), deq)
    np.testing.assert_array_equal(f.indices, q.indices)
    via_bsr = BlockSparseMatrix.from_bsr(BlockSparseMatrix.from_dense(w, (4, 1)).to_bsr(), dtype="int8")
    np.testing.assert_array_equal(via_bsr.data, q.data)


def test_parse_block():
    assert parse_block("4x1") == (4, 1) and parse_block((1, 4)) == (1, 4) and parse_block("16X1") == (16, 1)
    for bad in ("4", "4x", "ax1", (0, 1), "4x1x1", None):
        with pytest.raises(ValueError):
            parse_block(bad)


def _valid_parts():
    w = np.arange(1, 33, dtype=np.float32).reshape(8, 4)
    m = BlockSparseMatrix.from_dense(w, (4, 1))
    return dict(shape=m.shape, block=m.block, indptr=m.indptr, indices=m.indices, data=m.data)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(block=(3, 1)), "does not divide"),
        (dict(indptr=np.array([0, 4], np.int32)), "indptr must have"),
        (dict(indptr=np.array([1, 4, 8], np.int32)), "indptr\\[0\\]"),
        (dict(indptr=np.array([0, 5, 4], np.int32)), "non-decreasing"),
        (dict(indices=np.array([0, 1, 2, 4, 0, 1, 2, 3], np.int32)), "out of range"),
        (dict(indices=np.array([0, 2, 1, 3, 0, 1, 2, 3], np.int32)), "strictly increasing"),
        (dict(indices=np.array([0, 1, 1, 3, 0, 1, 2, 3], np.int32)), "strictly increasing"),
        (dict(indices=np.array([0, 1, 2, 3, 0, 1, 2], np.int32)), "indices has"),
        (dict(indices=np.array([0.0] * 8)), "integer"),
        (dict(data=np.zeros((8, 4, 1), np.float64)), "dtype"),
        (dict(data=np.zeros((8, 4, 2), np.float32)[:, :, :1]), "C-contiguous"),
        (dict(data=np.zeros((8, 1, 4), np.float32)), "data must have shape"),
        (dict(data=np.full((8, 4, 1), np.nan, np.float32)), "NaN"),
        (dict(data=np.zeros((8, 4, 1), np.int8)), "scales"),
        (dict(scales=np.ones(8, np.float32)), "only allowed with int8"),
        (dict(bias=np.ones(7, np.float32)), "bias must have shape"),
        (dict(bias=np.ones(8, np.float64)), "bias must have dtype"),
        (dict(shape=(0, 4)), "positive"),
    ],
)
def test_format_validation(change, message):
    parts = _valid_parts()
    parts.update(change)
    with pytest.raises(ValueError, match=message):
        BlockSparseMatrix(**parts)


def test_from_dense_errors():
    with pytest.raises(ValueError, match="does not divide"):
        BlockSparseMatrix.from_dense(np.ones((6, 4), np.float32), (4, 1))
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseMatrix.from_dense(np.ones(4, np.float32), (1, 1))
    with pytest.raises(ValueError, match="mask must have"):
        BlockSparseMatrix.from_dense(np.ones((4, 4), np.float32), (4, 1), mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="NaN"):
        BlockSparseMatrix.from_dense(np.full((4, 4), np.inf, np.float32), (4, 1))
    with pytest.raises(ValueError, match="dtype"):
        BlockSparseMatrix.from_dense(np.ones((4, 4), np.float32), (4, 1), dtype="float16")
    with pytest.raises(ValueError, match="BSR"):
        BlockSparseMatrix.from_bsr(np.ones((4, 4)))


# ------------------------------------------------------------------------------------------------ spmm
@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("block", BLOCKS)
def test_spmm_grid(block, dtype):
    rng = np.random.default_rng(sum(block) * 7 + len(dtype))
    n_out, n_in = 48, 40
    for density in DENSITIES:
        w, _ = random_block_weight(rng, n_out, n_in, block, density)
        bias = rng.standard_normal(n_out).astype(np.float32)
        m = BlockSparseMatrix.from_dense(w, block, bias=bias if density != 0.5 else None, dtype=dtype)
        wd = m.to_dense()
        for tokens in TOKENS:
            x = rng.standard_normal((tokens, n_in)).astype(np.float32)
            for act, use_res in ((None, False), ("gelu", False), (None, True), ("gelu", True)):
                res = rng.standard_normal((tokens, n_out)).astype(np.float32) if use_res else None
                y = spmm(x, m, activation=act, residual=res)
                ref = reference_spmm(x, m, activation=act, residual=res)
                assert_close(y, ref, x, wd)


@pytest.mark.parametrize("block", [(4, 1), (1, 1), (1, 4), (16, 1), (2, 2)])
def test_spmm_panels_large_k(block):
    """K = 1100 * 4 B * 64 tokens > 256 KB: several panels, each block row resumes where the last stopped."""
    rng = np.random.default_rng(3)
    w, _ = random_block_weight(rng, 32, 1100 if block[1] != 4 else 1104, block, 0.3)
    m = BlockSparseMatrix.from_dense(w, block, bias=rng.standard_normal(32).astype(np.float32))
    x = rng.standard_normal((70, w.shape[1])).astype(np.float32)
    assert_close(spmm(x, m, activation="gelu"), reference_spmm(x, m, activation="gelu"), x, w)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_direct_path_tiles_and_task_counter(dtype, threads):
    """(4k) x 1 blocks take the register-finished path: 16-token tiles at K = 3072 (the packed tile stays in L2),
    ragged tiles and slabs (M = 37, 97), rows padded to a multiple of 4 blocks, many tasks handed out through the
    atomic counter, in-place residual after GELU."""
    from sparsify.kernels.spmm import _plan_direct

    rng = np.random.default_rng(11)
    for n_out, n_in, block, tokens in [(64, 3072, (4, 1), 37), (96, 200, (8, 1), 97), (48, 384, (4, 1), 130)]:
        w, _ = random_block_weight(rng, n_out, n_in, block, 0.13)
        m = BlockSparseMatrix.from_dense(w, block, bias=rng.standard_normal(n_out).astype(np.float32), dtype=dtype)
        wd = m.to_dense()
        x = rng.standard_normal((tokens, n_in)).astype(np.float32)
        res = rng.standard_normal((tokens, n_out)).astype(np.float32)
        ref = reference_spmm(x, m, activation="gelu", residual=res)
        out = res.copy()
        y = spmm(x, m, activation="gelu", residual=out, out=out, threads=threads)
        assert y is out
        assert_close(y, ref, x, wd)
    assert _plan_direct(BlockSparseMatrix.from_dense(np.ones((8, 3072), np.float32), (4, 1)), 128, 1)[0] == 16


def test_empty_rows_give_bias_and_all_zero_matrix():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    w[4:12] = 0.0  # block rows 1 and 2 empty
    bias = rng.standard_normal(16).astype(np.float32)
    m = BlockSparseMatrix.from_dense(w, (4, 1), bias=bias)
    assert np.all(np.diff(m.indptr)[1:3] == 0)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    y = spmm(x, m)
    np.testing.assert_array_equal(y[:, 4:12], np.broadcast_to(bias[4:12], (5, 8)))
    z = BlockSparseMatrix.from_dense(np.zeros((16, 8), np.float32), (4, 1))
    assert z.nnz_blocks == 0
    np.testing.assert_array_equal(spmm(x, z), np.zeros((5, 16), np.float32))


def test_gelu_accuracy():
    from sparsify.kernels import _jit

    v = np.linspace(-12, 12, 20001).astype(np.float32)
    g = v.copy()
    _jit.gelu_vec(g)
    assert np.abs(g - gelu_reference(v)).max() < 2e-6


def test_out_and_inplace_residual_and_threads():
    rng = np.random.default_rng(5)
    w, _ = random_block_weight(rng, 64, 32, (4, 1), 0.4)
    m = BlockSparseMatrix.from_dense(w, (4, 1))
    x = rng.standard_normal((200, 32)).astype(np.float32)
    res = rng.standard_normal((200, 64)).astype(np.float32)
    ref = reference_spmm(x, m, residual=res)
    out = res.copy()
    y = spmm(x, m, residual=out, out=out)
    assert y is out
    assert_close(out, ref, x, w)
    y1 = spmm(x, m, threads=1)
    y2 = spmm(x, m, threads=2 if os.cpu_count() and os.cpu_count() > 1 else 1)
    np.testing.assert_array_equal(y1, y2)  # the partition never splits a dot product
    assert spmm(np.zeros((0, 32), np.float32), m).shape == (0, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=np.ones((3, 32), np.float64)), "float32"),
        (dict(x=np.ones((3, 31), np.float32)), "in_features"),
        (dict(x=np.ones(32, np.float32)), "2-D"),
        (dict(x=np.ones((32, 3), np.float32).T), "C-contiguous"),
        (dict(x=[[1.0] * 32]), "numpy array"),
        (dict(activation="relu"), "activation"),
        (dict(residual=np.ones((3, 63), np.float32)), "residual must have shape"),
        (dict(residual=np.ones((3, 64), np.float64)), "residual must be float32"),
        (dict(out=np.ones((64, 3), np.float32).T), "out must"),
        (dict(w=np.ones((64, 32), np.float32)), "BlockSparseMatrix"),
    ],
)
def test_spmm_bad_input(kwargs, message):
    w = BlockSparseMatrix.from_dense(np.ones((64, 32), np.float32), (4, 1))
    args = dict(x=np.ones((3, 32), np.float32), w=w)
    args.update(kwargs)
    x, w = args.pop("x"), args.pop("w")
    with pytest.raises(ValueError, match=message):
        spmm(x, w, **args)


def test_out_overlapping_x_rejected():
    w = BlockSparseMatrix.from_dense(np.ones((32, 32), np.float32), (4, 1))
    x = np.ones((3, 32), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        spmm(x, w, out=x)


def test_tile_constant():
    assert TILE_TOKENS == 64  # the micro-kernels and the tr8 transposes assume it


# ------------------------------------------------------------------------------------------------ property-based
def test_property_random_problems():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(
        block=st.sampled_from(BLOCKS),
        n_out_blocks=st.integers(1, 5),
        n_in_blocks=st.integers(1, 12),
        tokens=st.integers(1, 140),
        density=st.floats(0.0, 1.0),
        dtype=st.sampled_from(["float32", "int8"]),
        act=st.sampled_from([None, "gelu"]),
        seed=st.integers(0, 2**16),
    )
    def check(block, n_out_blocks, n_in_blocks, tokens, density, dtype, act, seed):
        rng = np.random.default_rng(seed)
        n_out, n_in = n_out_blocks * block[0], n_in_blocks * block[1]
        w, _ = random_block_weight(rng, n_out, n_in, block, density)
        m = BlockSparseMatrix.from_dense(w, block, bias=rng.standard_normal(n_out).astype(np.float32), dtype=dtype)
        x = rng.standard_normal((tokens, n_in)).astype(np.float32)
        assert_close(spmm(x, m, activation=act), reference_spmm(x, m, activation=act), x, m.to_dense())

    check()


# ------------------------------------------------------------------------------------------------ packaging, JIT-off, bench
def test_kernels_package_is_not_top_level_and_import_is_lean():
    code = "import importlib.util; s = importlib.util.find_spec('kernels'); print(s and s.origin)"
    origin = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert not origin.stdout.strip().startswith(str(REPO / "kernels")), (
        "`import kernels` resolves to the repository folder: it would shadow the Hugging Face `kernels` package"
    )
    code = "import sys, sparsify.kernels, sparsify.kernels.format; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "False", "importing sparsify.kernels must not import numba"


def test_python_fallback_with_jit_disabled():
    """The kernel bodies run as plain Python under NUMBA_DISABLE_JIT=1 (how their coverage is measured)."""
    code = """
import numpy as np
from sparsify.kernels.format import BlockSparseMatrix
from sparsify.kernels.spmm import spmm, reference_spmm
rng = np.random.default_rng(0)
worst = 0.0
for blk in [(4, 1), (1, 1), (1, 4), (2, 2)]:
    w = rng.standard_normal((16, 24)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    m = BlockSparseMatrix.from_dense(w, blk, bias=rng.standard_normal(16).astype(np.float32))
    x = rng.standard_normal((11, 24)).astype(np.float32)
    r = rng.standard_normal((11, 16)).astype(np.float32)
    y = spmm(x, m, activation="gelu", residual=r)
    worst = max(worst, float(np.abs(y - reference_spmm(x, m, activation="gelu", residual=r)).max()))
print(worst)
"""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1e-4


def test_bench_quick_smoke(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from sparsify.kernels import bench

    monkeypatch.delenv("SPARSIFY_DEEPSPARSE_PYTHON", raising=False)
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(path), "--rounds", "1", "--min-time", "0"]) == 0
    record = json.loads(path.read_text())
    assert record["cpu"]["cpu_count"] >= 1 and record["threads"] >= 1  # timings compare only on the same CPU
    if Path("/proc/cpuinfo").exists():
        assert "flags" in record["cpu"]
    records = record["records"]
    required = {"out_features", "in_features", "tokens", "sparsity", "block", "method", "median_ms", "min_ms",
                "max_ms", "speedup_vs_torch_dense"}
    assert records and all(required <= set(r) for r in records)
    assert {(r["out_features"], r["in_features"]) for r in records} == set(bench.SHAPES)
    assert {r["tokens"] for r in records} == {128} and {r["sparsity"] for r in records} == {0.9}
    assert {"ours_fp32", "torch_dense", "torch_csr"} <= {r["method"] for r in records}
    assert all(r["block"] == "4x1" and r["median_ms"] > 0 for r in records)
    assert all(r["speedup_vs_torch_dense"] == 1.0 for r in records if r["method"] == "torch_dense")
    assert "4x1 (out x in)" in capsys.readouterr().out
    assert bench.main(["--block", "5x1", "--quick"]) == 2  # 5 does not divide 384


def test_launch_plans_are_bounded_and_their_eviction_keeps_the_padded_weights():
    """A length-adaptive runtime calls each matrix with a new token count almost every time: the plans cached per
    token count stay bounded, and evicting them leaves the padded copy of the weights (built once) in place."""
    from sparsify.kernels import spmm as spmm_module
    from sparsify.kernels.spmm import spmm

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w[rng.random((8, 16)).repeat(4, axis=0) < 0.6] = 0.0
    m = BlockSparseMatrix.from_dense(w, (4, 1))
    padded = None
    for tokens in range(1, spmm_module._MAX_PLANS + 10):
        x = rng.standard_normal((tokens, 16)).astype(np.float32)
        np.testing.assert_allclose(spmm(x, m, threads=1), x @ w.T, rtol=1e-5, atol=1e-5)
        if padded is None:
            padded = m._cache[("padded", spmm_module._PAD)]
        assert len(m._cache["plans"]) <= spmm_module._MAX_PLANS
    assert m._cache[("padded", spmm_module._PAD)] is padded  # never rebuilt


def test_workspaces_start_on_cache_lines():
    """The packed tiles are read in 32 / 64-byte pieces: every per-worker workspace row starts a cache line,
    whatever numpy's allocator returns (it promises 16 bytes)."""
    from sparsify.kernels import int8 as int8_mod
    from sparsify.kernels import spmm as spmm_mod
    from sparsify.kernels.int8 import spmm_int8

    for shape, dtype in [((3, 7), np.float32), ((2, 49152), np.float32), ((1, 1536, 64), np.uint8), ((5,), np.int64)]:
        for _ in range(4):
            a = spmm_mod.zeros_aligned(shape, dtype)
            assert a.ctypes.data % 64 == 0 and a.shape == shape and a.dtype == dtype and not a.any()
    rng = np.random.default_rng(3)
    for n_in in (24, 384, 1544):
        m = BlockSparseMatrix.from_dense(rng.standard_normal((16, n_in)).astype(np.float32), (4, 1))
        x = rng.standard_normal((70, n_in)).astype(np.float32)
        spmm(x, m, threads=2 if (os.cpu_count() or 1) > 1 else 1)
        spmm(x, m.quantize())
        spmm_int8(x, m)
        for ws in (spmm_mod._local.xs, spmm_mod._local.wide):
            assert all(ws[w].ctypes.data % 64 == 0 for w in range(ws.shape[0]))
        for xt, _, _ in int8_mod._local.ws.values():
            assert all(xt[w].ctypes.data % 64 == 0 for w in range(xt.shape[0]))


def test_thread_setting_is_read_back_after_every_change():
    """``threads.get_num_threads`` (a direct read once numba's pool is up) follows set_num_threads, the
    ``num_threads`` context and numba's own setter, and the plan of a call uses it."""
    import numba

    from sparsify.kernels import threads

    top = min(2, int(numba.config.NUMBA_NUM_THREADS))
    threads.set_num_threads(top)
    assert threads.get_num_threads() == top
    with threads.num_threads(1):
        assert threads.get_num_threads() == 1
        m = BlockSparseMatrix.from_dense(np.ones((8, 16), np.float32), (4, 1))
        spmm(np.ones((200, 16), np.float32), m)
        assert ("direct", 200, 1) in m._cache["plans"]
    assert threads.get_num_threads() == top
    numba.set_num_threads(1)
    assert threads.get_num_threads() == 1
    threads.set_num_threads(top)
