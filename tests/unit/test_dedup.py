"""The worker's dedup (a compiled hash table): distinct keys in order of first appearance and an
inverse that rebuilds the list, against np.unique."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.client.keyplan import unique_inverse


@pytest.mark.parametrize("n", [0, 1, 10, 2048, 50_000])
def test_unique_inverse_rebuilds_the_list(n: int) -> None:
    rng = np.random.default_rng(n)
    flat = rng.integers(0, max(1, n // 3), size=n).astype(np.uint64)
    flat[: n // 2] += np.uint64(2**63)  # keys above int64's range too
    uniq, inverse = unique_inverse(flat)
    assert uniq.dtype == np.uint64 and inverse.dtype == np.intp
    assert len(np.unique(uniq)) == len(uniq)  # distinct
    np.testing.assert_array_equal(uniq[inverse], flat)
    np.testing.assert_array_equal(np.sort(uniq), np.unique(flat))


def test_distinct_keys_come_in_order_of_first_appearance() -> None:
    flat = np.array([9, 4, 9, 1] * 2048, np.uint64)
    uniq, inverse = unique_inverse(flat)
    assert uniq.tolist() == [9, 4, 1]
    assert inverse[:5].tolist() == [0, 1, 0, 2, 0]


def test_a_shorter_list_after_a_longer_one_reuses_the_table_correctly() -> None:
    """The hash table is kept between calls: a short list after a long one must not see the
    long one's keys."""
    unique_inverse(np.arange(100_000, dtype=np.uint64))
    uniq, inverse = unique_inverse(np.array([7, 3, 7], np.uint64))
    assert uniq.tolist() == [7, 3] and inverse.tolist() == [0, 1, 0]
