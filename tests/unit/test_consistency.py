"""Clocks, pull readiness and the deterministic sync aggregation."""

from __future__ import annotations

import numpy as np

from paramserver.server.consistency import (
    Clocks,
    SyncBuffer,
    aggregate_dense,
    aggregate_sparse,
    pull_ready,
    staleness_of,
)


def test_min_clock_over_live_workers() -> None:
    c = Clocks(3)
    c.advance(0, 2)
    c.advance(1, 1)
    assert c.min_clock == 0 and c.slowest() == [(2, 0)]
    c.set_live({0, 1})
    assert c.min_clock == 1
    c.advance(1, 0)  # clocks never go back
    assert c.min_clock == 1
    c.set_live(set())
    assert pull_ready("sync", 0, 10**6, c.min_clock)


def test_pull_rules() -> None:
    assert pull_ready("sync", 0, 3, 3) and not pull_ready("sync", 0, 3, 2)
    assert pull_ready("ssp", 2, 5, 3) and not pull_ready("ssp", 2, 6, 3)
    assert pull_ready("async", -1, 100, 0)
    assert staleness_of(5, 3) == 2 and staleness_of(3, 5) == 0


def test_sparse_aggregation_sums_per_worker_then_in_rank_order() -> None:
    f = np.float32
    pushes = [
        (1, np.array([5, 3], np.uint64), np.array([[1.0], [2.0]], f)),
        (0, np.array([5], np.uint64), np.array([[1e8]], f)),
        (1, np.array([5], np.uint64), np.array([[-1e8]], f)),
        (2, np.array([9], np.uint64), np.array([[4.0]], f)),
    ]
    keys, mean = aggregate_sparse(pushes, num_live=3)
    assert keys.tolist() == [3, 5, 9]
    # key 5: worker 1's sum (1 + -1e8) first, then worker 0's 1e8 + worker 1's sum, in rank order
    w1 = f(1.0) + f(-1e8)
    expect5 = (f(1e8) + w1) / f(3)
    np.testing.assert_array_equal(mean[:, 0], [f(2.0) / f(3), expect5, f(4.0) / f(3)])


def test_dense_aggregation_and_buffer() -> None:
    f = np.float32
    out = aggregate_dense(
        [(1, np.array([1.0], f)), (0, np.array([2.0], f)), (1, np.array([3.0], f))], num_live=2
    )
    np.testing.assert_array_equal(out, [(f(2.0) + (f(1.0) + f(3.0))) / f(2)])
    buf = SyncBuffer("dense")
    buf.add(2, "b")
    buf.add(0, "a")
    buf.add(5, "c")
    assert buf.take_completed(3) == [(0, ["a"]), (2, ["b"])]
    assert list(buf.pending) == [5]
