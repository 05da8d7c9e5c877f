"""Error feedback of encoded pushes (paramserver.client.feedback) against NumPy references:
applied sums track true sums, the sparse residual store stays bounded, flat codecs round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.client.feedback import DenseFeedback, SparseFeedback
from paramserver.wire.codec import BLOCK, decode_flat, decode_pushed, decode_rows, encode_flat

CODECS = ["float16", "bfloat16", "int8"]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n", [0, 1, BLOCK - 1, BLOCK, 3 * BLOCK + 17])
def test_flat_round_trip_within_the_codec_bound(codec: str, n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 3
    arrays = encode_flat(x, codec)
    assert arrays[0].shape == (n,)
    got = decode_flat(arrays, codec, n, np.float32)
    if codec == "int8":  # per block: the block's largest value / 254
        for a in range(0, n, BLOCK):
            block = x[a : a + BLOCK]
            assert np.all(np.abs(got[a : a + BLOCK] - block) <= np.abs(block).max() / 254 * 1.001)
    else:
        rel = 2.0**-11 if codec == "float16" else 2.0**-8
        assert np.all(np.abs(got - x) <= np.abs(x) * rel + 1e-7)


def test_flat_and_pushed_decoding_refuse_what_does_not_fit() -> None:
    x = np.ones(300, np.float32)
    with pytest.raises(ValueError, match="shape"):
        decode_flat(encode_flat(x, "bfloat16"), "bfloat16", 299, np.float32)
    with pytest.raises(ValueError, match="arrays"):
        decode_flat(encode_flat(x, "int8")[:1], "int8", 300, np.float32)
    with pytest.raises(ValueError, match="scales"):
        q, s = encode_flat(x, "int8")
        decode_flat([q, s[:1]], "int8", 300, np.float32)
    with pytest.raises(ValueError, match="codec"):
        decode_pushed([x], "none", "dense", 300, np.float32)
    with pytest.raises(ValueError, match="arrays"):
        decode_pushed([], "int8", "sparse", 4, np.float32)


@pytest.mark.parametrize("codec", CODECS)
def test_sparse_feedback_applied_plus_residual_is_the_true_sum(codec: str) -> None:
    rng = np.random.default_rng(1)
    pool = rng.choice(2**62, size=400, replace=False).astype(np.uint64)
    fb = SparseFeedback(8, np.dtype(np.float32))
    true: dict[int, np.ndarray] = {}
    applied: dict[int, np.ndarray] = {}
    for _ in range(60):
        keys = rng.choice(pool, size=100, replace=False)  # distinct, as after a plan's dedup
        g = (rng.standard_normal((100, 8)) * 0.01 + 0.003).astype(np.float32)
        g[:, 0] = 1.0  # a large value per row: the small ones round hard
        dec = decode_rows(fb.encode(keys, g, codec), codec, 8, np.float32)
        for k, gi, di in zip(keys.tolist(), g, dec, strict=True):
            true[k] = true.get(k, 0) + gi.astype(np.float64)
            applied[k] = applied.get(k, 0) + di.astype(np.float64)
    keys = np.array(sorted(true), np.uint64)
    t = np.array([true[k] for k in keys.tolist()])
    a = np.array([applied[k] for k in keys.tolist()])
    r = fb.residual(keys).astype(np.float64)
    np.testing.assert_allclose(a + r, t, rtol=0, atol=1e-5)  # nothing lost, only delayed
    assert np.abs(r).max() <= 1.01 / 254 * 1.5  # at most about one rounding kept


def test_sparse_feedback_is_bounded_and_drops_at_most_a_residual() -> None:
    fb = SparseFeedback(4, np.dtype(np.float32), capacity=64)
    assert fb.capacity == 64 and fb.rows.shape == (64, 4)
    rng = np.random.default_rng(2)
    for _ in range(20):  # far more keys than slots: slots are taken over, nothing grows
        keys = rng.choice(2**62, size=500, replace=False).astype(np.uint64)
        g = rng.standard_normal((500, 4)).astype(np.float32)
        sent = decode_rows(fb.encode(keys, g, "int8"), "int8", 4, np.float32)
        # every row sent is its gradient plus at most one kept residual (one rounding)
        assert np.all(np.abs(sent - g) <= 2 * np.abs(g).max() / 254 * 1.01)
    assert fb.rows.shape == (64, 4) and fb.used.sum() <= 64


def test_sparse_feedback_leaves_the_gradient_alone_and_clips_half_overflow() -> None:
    fb = SparseFeedback(2, np.dtype(np.float32))
    keys = np.array([5, 9], np.uint64)
    g = np.array([[1e6, 1.0], [-1e6, 2.0]], np.float32)
    before = g.copy()
    dec = decode_rows(fb.encode(keys, g, "float16"), "float16", 2, np.float32)
    np.testing.assert_array_equal(g, before)
    assert np.all(np.isfinite(dec)) and abs(dec[0, 0]) == 65504.0
    # the excess waits in the residual and goes with the next pushes
    np.testing.assert_allclose(fb.residual(keys)[:, 0], [1e6 - 65504, -(1e6 - 65504)], rtol=1e-3)


@pytest.mark.parametrize("codec", CODECS)
def test_dense_feedback_by_range_tracks_the_true_sum(codec: str) -> None:
    size, cut = 1000, 377
    fb = DenseFeedback(size, np.dtype(np.float32))
    rng = np.random.default_rng(3)
    true = np.zeros(size)
    applied = np.zeros(size)
    for _ in range(50):
        g = (rng.standard_normal(size) * 0.01 + 0.003).astype(np.float32)
        g[::BLOCK] = 1.0
        for a, b in ((0, cut), (cut, size)):
            applied[a:b] += decode_flat(fb.encode(g, a, b, codec), codec, b - a, np.float32)
        true += g
    np.testing.assert_allclose(applied + fb.values, true, rtol=0, atol=1e-5)


@pytest.mark.parametrize("codec", CODECS)
def test_flat_encoding_with_the_compiled_encoder_is_bit_identical(codec: str) -> None:
    from paramserver.server.codec_kernels import encode_rows_fast

    x = np.random.default_rng(9).standard_normal(3 * BLOCK + 5).astype(np.float32)
    for a, b in zip(encode_flat(x, codec), encode_flat(x, codec, encode_rows_fast), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
