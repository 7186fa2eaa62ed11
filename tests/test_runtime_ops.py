"""The runtime's numba ops against plain float64 references: attention (every shape path: odd lengths, odd head
dimensions, a single token, [CLS]-only, the attention received, the fused fake quantization) and the head's
float64 Linear."""

from __future__ import annotations

import numpy as np
import pytest

from sparsify.runtime import ops
from sparsify.runtime.attention import attention


def reference_attention(qkv, lens, n_heads):
    """float64 softmax attention per packed sequence: (context (tokens, hidden), received (tokens,))."""
    qkv = qkv.astype(np.float64)
    H = qkv.shape[1] // 3
    d = H // n_heads
    ctx = np.zeros((qkv.shape[0], H))
    received = np.zeros(qkv.shape[0])
    st = 0
    for L in lens:
        rows = qkv[st:st + L]
        for h in range(n_heads):
            q, k, v = (rows[:, o + h * d:o + (h + 1) * d] for o in (0, H, 2 * H))
            s = q @ k.T / np.sqrt(d)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            ctx[st:st + L, h * d:(h + 1) * d] = p @ v
            received[st:st + L] += p.sum(axis=0)
        st += L
    return ctx, received


def packed(lens):
    lens = np.asarray(lens, np.int64)
    starts = np.zeros_like(lens)
    starts[1:] = np.cumsum(lens)[:-1]
    return starts, lens


@pytest.mark.parametrize("n_heads,d,lens", [
    (12, 32, [128, 128]),          # MiniLM's heads at the benchmark length
    (3, 5, [1, 2, 3, 7, 8, 33]),   # odd head dimension, odd lengths, a single token
    (2, 8, [5, 1, 9]),
    (4, 3, [2, 3, 4]),             # head dimension under the unrolling width
])
def test_attention_matches_float64_reference(n_heads, d, lens):
    rng = np.random.default_rng(len(lens) + d)
    starts, lens = packed(lens)
    qkv = rng.standard_normal((int(lens.sum()), 3 * n_heads * d)).astype(np.float32)
    ref, ref_received = reference_attention(qkv, lens, n_heads)
    ctx, received = attention(qkv, starts, lens, n_heads, significance=True)
    np.testing.assert_allclose(ctx, ref, atol=2e-5)
    np.testing.assert_allclose(received, ref_received, rtol=1e-4, atol=1e-4)
    # [CLS] only: the first row of every sequence, and what it gives to each token
    first, first_received = attention(qkv, starts, lens, n_heads, significance=True, first_query_only=True)
    np.testing.assert_allclose(first, ref[starts], atol=2e-5)
    assert first.shape == (len(lens), n_heads * d)
    # each head's [CLS] distribution sums to one
    for st, L in zip(starts, lens):
        assert first_received[st:st + L].sum() == pytest.approx(n_heads, rel=1e-4)


def test_attention_fused_fake_quant_is_fake_quant_of_the_context():
    rng = np.random.default_rng(3)
    starts, lens = packed([17, 40, 3])
    n_heads, d = 4, 8
    H = n_heads * d
    qkv = rng.standard_normal((int(lens.sum()), 3 * H)).astype(np.float32)
    scale = np.full(H, 0.01, np.float32)
    zp = np.full(H, 128.0, np.float32)
    plain, _ = attention(qkv, starts, lens, n_heads)
    fused, _ = attention(qkv, starts, lens, n_heads, quant=(scale, zp, 8, False))
    # the same float32 context, then the same rounding (half to even) and clamping as the separate pass
    np.testing.assert_array_equal(fused, ops.fake_quant(plain, scale, zp))
    assert not np.array_equal(fused, plain)


def test_attention_rejects_bad_input():
    starts, lens = packed([4, 4])
    qkv = np.zeros((8, 3 * 8), np.float32)
    with pytest.raises(ValueError, match="qkv width"):
        attention(qkv, starts, lens, 3)
    with pytest.raises(ValueError, match="starts / lens"):
        attention(qkv, *packed([4, 5]), 2)
    with pytest.raises(ValueError, match="float32"):
        attention(qkv.astype(np.float64), starts, lens, 2)


@pytest.mark.parametrize("tanh", [False, True])
def test_linear64_matches_numpy(tanh):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 24)).astype(np.float32)
    w = rng.standard_normal((5, 24)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    got = ops.linear64(x, w, b, tanh=tanh)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, np.tanh(ref) if tanh else ref, rtol=1e-12, atol=1e-12)
    assert ops.linear64(x[:0], w, b).shape == (0, 5)
    with pytest.raises(ValueError, match="do not fit"):
        ops.linear64(x, w[:, :10], b)
