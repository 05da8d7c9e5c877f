"""The worker's dedup: a hash table (pandas) for long key lists, np.unique otherwise; both give
distinct keys and an inverse that rebuilds the list."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.client import keyplan as tables
from paramserver.client.keyplan import FACTORIZE_MIN, unique_inverse


@pytest.mark.parametrize("n", [0, 1, 10, FACTORIZE_MIN, 50_000])
@pytest.mark.parametrize("with_pandas", [True, False])
def test_unique_inverse_rebuilds_the_list(
    n: int, with_pandas: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not with_pandas:
        monkeypatch.setattr(tables, "_factorize", lambda: None)
    rng = np.random.default_rng(n)
    flat = rng.integers(0, max(1, n // 3), size=n).astype(np.uint64)
    flat[: n // 2] += np.uint64(2**63)  # keys above int64's range too
    uniq, inverse = unique_inverse(flat)
    assert uniq.dtype == np.uint64 and inverse.dtype == np.intp
    assert len(np.unique(uniq)) == len(uniq)  # distinct
    np.testing.assert_array_equal(uniq[inverse], flat)
    np.testing.assert_array_equal(np.sort(uniq), np.unique(flat))


def test_long_lists_use_the_hash_table_when_pandas_is_there() -> None:
    pytest.importorskip("pandas")
    flat = np.array([9, 4, 9, 1] * FACTORIZE_MIN, np.uint64)
    uniq, _ = unique_inverse(flat)
    assert uniq.tolist() == [9, 4, 1]  # first appearance, not sorted: factorize was used
