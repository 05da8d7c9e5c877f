"""Barrier rules, without a socket: open when the expected workers arrived, time out naming
the missing ones."""

from __future__ import annotations

import pytest

from paramserver.config import Limits
from paramserver.coordinator.barriers import Barriers
from paramserver.errors import ConfigError


def test_a_barrier_opens_once_every_expected_worker_arrived() -> None:
    barriers = Barriers()
    barriers.arrive("step#1", 0, (b"w0", 10), deadline=30.0)
    barriers.arrive("step#1", 2, (b"w2", 11), deadline=30.0)
    assert barriers.complete([0, 1, 2]) == []
    barriers.arrive("step#1", 1, (b"w1", 12), deadline=30.0)
    assert barriers.complete([0, 1, 2]) == [[(b"w0", 10), (b"w2", 11), (b"w1", 12)]]
    assert barriers.barriers == {} and barriers.complete([0, 1, 2]) == []


def test_a_barrier_stops_waiting_for_a_worker_that_died() -> None:
    barriers = Barriers()
    barriers.arrive("b", 0, (b"w0", 1), deadline=30.0)
    assert barriers.complete([0, 1]) == []
    assert barriers.complete([0]) == [[(b"w0", 1)]]  # worker[1] is no longer expected


def test_barriers_are_independent_by_name() -> None:
    barriers = Barriers()
    barriers.arrive("a", 0, (b"w0", 1), deadline=30.0)
    barriers.arrive("b", 1, (b"w1", 2), deadline=30.0)
    barriers.arrive("a", 1, (b"w1", 3), deadline=30.0)
    assert barriers.complete([0, 1]) == [[(b"w0", 1), (b"w1", 3)]]
    assert list(barriers.barriers) == ["b"]


def test_a_timed_out_barrier_names_the_missing_workers() -> None:
    barriers = Barriers()
    barriers.arrive("epoch-end#7", 1, (b"w1", 5), deadline=20.0)
    barriers.arrive("epoch-end#7", 3, (b"w3", 6), deadline=10.0)  # the latest deadline counts
    assert barriers.expired(15.0, [0, 1, 2, 3]) == []
    [(waiters, why)] = barriers.expired(20.5, [0, 1, 2, 3])
    assert waiters == [(b"w1", 5), (b"w3", 6)]
    assert why == "barrier 'epoch-end' timed out waiting for worker[0], worker[2]"
    assert barriers.barriers == {}


def test_barriers_past_the_limits_are_refused_and_change_nothing() -> None:
    barriers = Barriers(Limits(barriers=3, peer_barriers=2))
    barriers.arrive("a", 0, (b"w0", 1), deadline=30.0)
    barriers.arrive("b", 0, (b"w0", 2), deadline=30.0)
    with pytest.raises(ConfigError, match=r"already waits at 2 barriers"):
        barriers.arrive("c", 0, (b"w0", 3), deadline=30.0)
    barriers.arrive("c", 1, (b"w1", 4), deadline=30.0)
    with pytest.raises(ConfigError, match=r"3 barriers are open"):
        barriers.arrive("d", 2, (b"w2", 5), deadline=30.0)
    with pytest.raises(ConfigError, match="at most 256 characters"):
        barriers.arrive("x" * 400, 1, (b"w1", 6), deadline=30.0)
    barriers.arrive("a", 1, (b"w1", 7), deadline=30.0)  # an open barrier is always joined
    assert sorted(barriers.barriers) == ["a", "b", "c"]
    assert barriers.complete([0, 1]) == [[(b"w0", 1), (b"w1", 7)]]
