"""The worker's compiled dedup and gradient sum against NumPy: np.unique's sets and
np.add.at's sums, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.client.kernels import dedup, sum_rows


@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_dedup_finds_each_distinct_key_once_in_order_of_first_appearance(n: int) -> None:
    rng = np.random.default_rng(n)
    keys = rng.zipf(1.3, size=n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps
    keys[: n // 3] = np.uint64(2**64 - 1)  # the largest key too
    uniq, inverse = dedup(keys)
    np.testing.assert_array_equal(uniq[inverse], keys)
    np.testing.assert_array_equal(np.sort(uniq), np.unique(keys))
    first = np.unique(keys, return_index=True)[1]
    np.testing.assert_array_equal(uniq, keys[np.sort(first)])
    assert inverse.dtype == np.intp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_rows_adds_repeated_rows_in_batch_order_like_add_at(dtype: type) -> None:
    rng = np.random.default_rng(3)
    inverse = rng.integers(0, 50, size=4000).astype(np.intp)
    grads = rng.standard_normal((4000, 9)).astype(dtype) * 1e3
    expected = np.zeros((60, 9), dtype)
    np.add.at(expected, inverse, grads)  # the reference: one row after another
    got = sum_rows(inverse, grads, 60)
    assert got.dtype == dtype
    assert got.tobytes() == expected.tobytes()
