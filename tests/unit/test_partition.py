"""The hash ring and dense ranges."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver.errors import ConfigError
from paramserver.partition import (
    HashRing,
    check_replication,
    dense_copies,
    dense_pieces,
    dense_ranges,
    hash_keys,
    held_keys,
    holds,
    owners_held,
    replicas_of,
    split_by_owner,
)


def test_keys_spread_evenly_over_servers() -> None:
    keys = np.arange(200_000, dtype=np.uint64)  # sequential ids: the worst case for a weak hash
    owners = HashRing.build([0, 1, 2, 3]).route(keys)
    counts = np.bincount(owners, minlength=4)
    assert counts.min() > 0.6 * counts.mean(), counts


def test_routing_is_deterministic_and_consistent() -> None:
    keys = np.random.default_rng(0).integers(0, 2**64 - 1, 50_000, dtype=np.uint64)
    three = HashRing.build([0, 1, 2]).route(keys)
    np.testing.assert_array_equal(three, HashRing.build([2, 1, 0]).route(keys))
    four = HashRing.build([0, 1, 2, 3]).route(keys)
    moved = np.mean(three != four)
    assert 0.1 < moved < 0.4, "adding a 4th server should move about a quarter of the keys"
    assert np.all(four[three != four] == 3), "keys only move to the new server"


def test_hash_is_a_bijection_on_samples() -> None:
    keys = np.arange(100_000, dtype=np.uint64)
    assert len(np.unique(hash_keys(keys))) == len(keys)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=200), st.integers(1, 6))
def test_split_by_owner_groups_positions_in_order(owners: list[int], n: int) -> None:
    arr = np.array([o % n for o in owners], dtype=np.int32)
    order, bounds = split_by_owner(arr, n)
    assert bounds[0] == 0 and bounds[-1] == len(arr)
    for s in range(n):
        idx = order[bounds[s] : bounds[s + 1]]
        assert np.all(arr[idx] == s)
        assert np.all(np.diff(idx) > 0)
    assert sorted(order.tolist()) == list(range(len(arr)))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10**7), st.integers(1, 8))
def test_dense_ranges_tile_the_table(size: int, servers: int) -> None:
    ranges = dense_ranges("t", size, list(range(servers)), split_at=1000)
    assert ranges[0][1] == 0 and ranges[-1][2] == size
    for (_, _, stop), (_, start, _) in itertools.pairwise(ranges):
        assert stop == start
    if size >= 1000:
        assert [r[0] for r in ranges] == list(range(servers))
    else:
        assert len(ranges) == 1


def owner_of_each_element(ranges: list[tuple[int, int, int]], size: int) -> np.ndarray:
    owner = np.full(size, -1)
    for s, a, b in ranges:
        owner[a:b] = s
    return owner


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000), st.lists(st.integers(0, 6), min_size=1, max_size=5, unique=True),
       st.lists(st.integers(0, 6), min_size=1, max_size=5, unique=True))  # fmt: skip
def test_dense_pieces_are_exactly_the_elements_that_change_server(
    size: int, old_servers: list[int], new_servers: list[int]
) -> None:
    old = dense_ranges("t", size, old_servers, split_at=100)
    new = dense_ranges("t", size, new_servers, split_at=100)
    before, after = owner_of_each_element(old, size), owner_of_each_element(new, size)
    covered = np.zeros(size, int)
    for src, dst, a, b in dense_pieces(old, new):
        assert src != dst and a < b
        assert (before[a:b] == src).all() and (after[a:b] == dst).all()
        covered[a:b] += 1
    np.testing.assert_array_equal(covered, (before != after).astype(int))


def test_replicas_are_a_rank_and_the_next_ones_wrapping_around() -> None:
    assert replicas_of(1, 3, 1) == [1]
    assert replicas_of(2, 3, 2) == [2, 0]
    assert replicas_of(0, 3, 3) == [0, 1, 2]
    for n, k in itertools.product(range(1, 5), range(1, 5)):
        if k > n:
            continue
        for owner in range(n):
            assert {s for s in range(n) if holds(s, owner, n, k)} == set(replicas_of(owner, n, k))
        # every server holds k owners' ranges: the copies spread evenly
        assert all(sum(holds(s, o, n, k) for o in range(n)) == k for s in range(n))
    assert check_replication(2, 3) == 2
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ConfigError, match="replication must be an integer"):
            check_replication(bad, 3)
    with pytest.raises(ConfigError, match="replication=4 needs at least 4 servers"):
        check_replication(4, 3)


def test_replicas_follow_the_ring_members_so_a_join_or_drain_changes_few_owners() -> None:
    # a fixed set given as a list is the same placement as its count (checkpoints agree)
    for n, k in itertools.product(range(1, 6), range(1, 4)):
        for owner in range(n):
            assert replicas_of(owner, list(range(n)), k) == replicas_of(owner, n, k)
    assert replicas_of(3, [0, 1, 3], 2) == [3, 0]
    assert replicas_of(1, [0, 2, 3], 2) == [1, 2]  # off the ring: placed where it sorts
    assert owners_held(0, [0, 1, 2], 2) == [0, 2]
    assert owners_held(3, [0, 1, 2], 2) == []
    # a join of 5 into 0..4, k = 2: only owner 4's copies change (4's second copy is 5, not 0)
    old, new = [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]
    changed = [o for o in old if replicas_of(o, old, 2) != replicas_of(o, new, 2)]
    assert changed == [4]
    # a drain of 2 from 0..4: owner 1's second copy becomes 3
    drained = [0, 1, 3, 4]
    assert [o for o in drained if replicas_of(o, old, 2) != replicas_of(o, drained, 2)] == [1]
    # every server of a ring holds k owners' ranges, each owner k distinct servers
    for ring in ([0, 2, 5], [1, 2, 3, 7], [4]):
        for k in range(1, len(ring) + 1):
            for o in ring:
                assert len(set(replicas_of(o, ring, k))) == k
            assert all(len(owners_held(s, ring, k)) == k for s in ring)


def test_held_keys_are_the_keys_of_the_owners_a_server_copies() -> None:
    keys = np.arange(5000, dtype=np.uint64)
    ring = HashRing.build([0, 2, 5])
    owners = ring.route(keys)
    for k in (1, 2, 3):
        count = np.zeros(len(keys), int)
        for s in (0, 2, 5):
            mask = held_keys(keys, ring, s, k)
            want = np.array([s in replicas_of(int(o), [0, 2, 5], k) for o in owners])
            np.testing.assert_array_equal(mask, want)
            count += mask
        assert (count == k).all()  # every key on exactly k servers
    assert held_keys(keys[:0], ring, 0, 2).shape == (0,)


@pytest.mark.parametrize(("old_ring", "new_ring"), [([0, 1, 2], [0, 1, 2, 3]), ([0, 1, 2], [1, 2]),
                                                    ([0, 2], [0, 1, 2])])  # fmt: skip
def test_dense_copies_reach_every_new_holder_once_from_the_old_primary(
    old_ring: list[int], new_ring: list[int]
) -> None:
    for owner in old_ring:
        new_owner = owner if owner in new_ring else replicas_of(owner, old_ring, 2)[1]
        pieces = dense_copies([(owner, 0, 8)], [(new_owner, 0, 8)], (old_ring, new_ring), 2)
        had, has = replicas_of(owner, old_ring, 2), replicas_of(new_owner, new_ring, 2)
        assert pieces == [(owner, r, 0, 8) for r in has if r not in had]
    # without copies: dense_pieces
    old, new = [(0, 0, 10), (1, 10, 20)], [(0, 0, 7), (1, 7, 14), (2, 14, 20)]
    assert dense_copies(old, new, ([0, 1], [0, 1, 2]), 1) == dense_pieces(old, new)
