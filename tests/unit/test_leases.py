"""Lease rules, without a socket: each part once per epoch, a lost worker's parts requeued."""

from __future__ import annotations

import pytest

from paramserver.config import Limits
from paramserver.coordinator.leases import Leases
from paramserver.errors import ConfigError
from paramserver.wire.messages import AcquireLeaseMsg, CompleteLeaseMsg


def acquire(leases: Leases, rank: int, parts: int = 8, epoch: int = 1, dataset: str = "d") -> int:
    h: AcquireLeaseMsg = {
        "kind": "acquire_lease",
        "id": 1,
        "dataset": dataset,
        "epoch": epoch,
        "shards": parts,
        "rank": rank,
    }
    return leases.acquire(h)


def complete(leases: Leases, rank: int, part: int, epoch: int = 1, dataset: str = "d") -> None:
    h: CompleteLeaseMsg = {
        "kind": "complete_lease",
        "id": 2,
        "dataset": dataset,
        "epoch": epoch,
        "shard": part,
        "rank": rank,
    }
    leases.complete(h)


def test_every_part_is_handed_out_once_per_epoch_in_a_shuffled_order() -> None:
    orders = []
    for epoch in (1, 2):
        leases = Leases()
        got = [acquire(leases, rank=i % 3, parts=50, epoch=epoch) for i in range(50)]
        assert sorted(got) == list(range(50))
        assert acquire(leases, rank=0, parts=50, epoch=epoch) == -1  # none left
        orders.append(got)
    assert orders[0] != orders[1] and orders[0] != list(range(50))
    again = Leases()  # the same order in another coordinator: it depends on (data set, epoch)
    assert [acquire(again, rank=0, parts=50) for _ in range(50)] == orders[0]


def test_a_lost_workers_parts_go_back_and_are_handed_out_next() -> None:
    leases = Leases()
    a1, b1, a2 = acquire(leases, 0), acquire(leases, 1), acquire(leases, 0)
    complete(leases, 0, a1)
    leases.requeue(0, "worker[0]")
    book = leases.books[("d", 1)]
    assert book.held == {b1: 1} and book.done == {a1}
    assert acquire(leases, 1) == a2  # the requeued part first
    rest = [acquire(leases, 1) for _ in range(5)]
    assert sorted([a1, b1, a2, *rest]) == list(range(8))
    assert acquire(leases, 1) == -1


def test_completing_a_part_held_by_another_is_refused_and_changes_nothing() -> None:
    leases = Leases()
    part = acquire(leases, 0)
    with pytest.raises(ConfigError, match=rf"shard {part} is not leased to worker\[1\]"):
        complete(leases, 1, part)
    assert leases.books[("d", 1)].held == {part: 0}
    complete(leases, 0, part)
    with pytest.raises(ConfigError, match="is not leased"):
        complete(leases, 0, part)  # twice
    with pytest.raises(ConfigError, match="no lease was ever handed out"):
        complete(leases, 0, 0, dataset="other")


def test_workers_that_count_the_parts_differently_are_refused() -> None:
    leases = Leases()
    acquire(leases, 0, parts=8)
    with pytest.raises(
        ConfigError, match=r"has 8 shards, worker\[1\] counts 9: the workers disagree"
    ):
        acquire(leases, 1, parts=9)
    assert len(leases.books[("d", 1)].held) == 1


def test_the_books_of_the_last_two_epochs_are_kept() -> None:
    leases = Leases()
    for epoch in (1, 2, 3):
        acquire(leases, 0, epoch=epoch)
    acquire(leases, 0, dataset="e")
    assert sorted(leases.books) == [("d", 2), ("d", 3), ("e", 1)]


def test_lease_books_past_the_limits_are_refused_and_change_nothing() -> None:
    leases = Leases(Limits(lease_parts=100, datasets=2))
    acquire(leases, 0, parts=60)
    with pytest.raises(ConfigError, match=r"has 50 shards.*hold 60 of their limit of 100"):
        acquire(leases, 0, parts=50, dataset="e")
    assert list(leases.books) == [("d", 1)]
    acquire(leases, 0, parts=40, dataset="e")
    with pytest.raises(ConfigError, match=r"lease books for 2 data-set epochs"):
        acquire(leases, 0, parts=0, dataset="f")
    with pytest.raises(ConfigError, match="at most 256 characters"):
        acquire(leases, 0, parts=1, dataset="x" * 257)
    with pytest.raises(ConfigError, match="shards must be a count"):
        acquire(leases, 0, parts=-1, dataset="d", epoch=5)
    assert sorted(leases.books) == [("d", 1), ("e", 1)]


def test_a_default_coordinator_refuses_a_book_of_two_to_the_24_parts_at_once() -> None:
    leases = Leases()
    with pytest.raises(ConfigError, match=r"Limits\(lease_parts=\.\.\.\)"):
        acquire(leases, 0, parts=2**24)
    assert leases.books == {}
    big = Leases(Limits(lease_parts=2**24))  # allowed when asked for: arrays, not lists
    assert 0 <= acquire(big, 0, parts=2**24) < 2**24
    assert big.books[("d", 1)].holder.nbytes == 4 * 2**24
