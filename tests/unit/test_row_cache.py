"""The worker's row cache (paramserver.client.cache) against a dict model: what it serves is
what was filled, never staler than the bound, and kept gradients sum to the pushed ones."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.client.cache import CacheSpec, RowCache, check_cache
from paramserver.errors import ConfigError

U64 = np.uint64


def test_reads_serve_filled_rows_within_the_bound_against_a_dict_model() -> None:
    rng = np.random.default_rng(0)
    cache = RowCache(CacheSpec(rows=64, staleness=2), dim=2, dtype=np.dtype(np.float64))
    model: dict[int, tuple[int, np.ndarray]] = {}  # key -> (version, row) of its last fill
    served = 0
    for clock in range(40):
        keys = rng.integers(0, 200, 50).astype(U64)
        out = np.full((50, 2), np.nan)
        miss, oldest = cache.read(keys, clock, out)
        hit = np.ones(50, bool)
        hit[miss] = False
        for i in np.flatnonzero(hit).tolist():
            version, row = model[int(keys[i])]  # served: it was filled, and is fresh enough
            assert clock - version <= 2
            np.testing.assert_array_equal(out[i], row)
            served += 1
        assert oldest <= 2
        staleness = int(rng.integers(0, 2))  # what the server reported for this fill
        rows = rng.standard_normal((len(miss), 2))
        cache.fill(keys, miss, rows, clock, staleness, out)
        np.testing.assert_array_equal(out[miss], rows)
        for p, row in zip(miss.tolist(), rows, strict=True):
            model[int(keys[p])] = (clock - staleness, row)
    stats = cache.stats()
    assert stats["hits"] == served > 0 and stats["evictions"] > 0
    assert max(stats["staleness"]) <= 2 and sum(stats["staleness"].values()) == 40 * 50


def test_kept_gradients_flush_as_their_sum() -> None:
    cache = RowCache(CacheSpec(rows=8, flush_every=3), dim=1, dtype=np.dtype(np.float64))
    pushes = [(np.array([1, 2, 1], U64), np.array([[1.0], [2.0], [4.0]])),
              (np.array([2, 3], U64), np.array([[8.0], [16.0]])),
              (np.array([1], U64), np.array([[32.0]]))]  # fmt: skip
    due = [cache.add(k, g) for k, g in pushes]
    assert due == [False, False, True] and cache.pending == 3
    pending = cache.take_pending()
    assert pending is not None and cache.take_pending() is None
    keys, grads = pending
    total = {int(k): float(g.sum()) for k in np.unique(keys) for g in [grads[keys == k]]}
    assert total == {1: 37.0, 2: 10.0, 3: 16.0}
    assert cache.stats()["flushes"] == 1 and cache.stats()["pushes"] == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"rows": 0}, "rows"), ({"staleness": -1}, "staleness"), ({"flush_every": 0}, "flush_every"),
     ({"rows": True}, "rows"), ({"staleness": 1.5}, "staleness")],
)  # fmt: skip
def test_bad_cache_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CacheSpec(**kwargs)  # type: ignore[arg-type]


def test_a_cache_on_a_sync_table_or_not_a_spec_is_refused() -> None:
    with pytest.raises(ConfigError, match="sync"):
        check_cache("emb", "sync", CacheSpec())
    with pytest.raises(ConfigError, match="CacheSpec"):
        check_cache("emb", "async", {"rows": 4})
    check_cache("emb", "ssp", CacheSpec())
