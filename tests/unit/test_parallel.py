"""parallel.halves: the same answer split or not, errors from either half propagate."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver import parallel
from paramserver.arrays import count_nonfinite
from paramserver.server import kernels as k


def test_halves_match_one_pass() -> None:
    rng = np.random.default_rng(0)
    n = (parallel.SPLIT_BYTES // 4) + 3  # odd length, just above the split size
    w = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    out = np.empty_like(w)
    want = w - np.float32(0.5) * g
    parts = parallel.halves(k.sgd_copy, [w, g, out], np.float32(0.5))
    assert len(parts) == 2
    np.testing.assert_array_equal(w, want)
    np.testing.assert_array_equal(out, want)
    g[n - 1] = np.nan
    g[0] = np.inf
    counts = parallel.halves(count_nonfinite, [g.view(np.uint32)], np.uint32(0x7F80_0000))
    assert [int(c) for c in counts] == [1, 1]
    small = np.ones(10, np.float32)
    assert parallel.halves(np.dot, [small, small]) == [10.0]


def test_an_error_in_either_half_propagates() -> None:
    a = np.zeros(parallel.SPLIT_BYTES, np.uint8)

    def fails_on_first(x: np.ndarray) -> int:
        if x.ctypes.data == a.ctypes.data:
            raise ValueError("first half")
        return 0

    with pytest.raises(ValueError, match="first half"):
        parallel.halves(fails_on_first, [a])

    def fails_on_second(x: np.ndarray) -> int:
        if x.ctypes.data != a.ctypes.data:
            raise ValueError("second half")
        return 0

    with pytest.raises(ValueError, match="second half"):
        parallel.halves(fails_on_second, [a])
