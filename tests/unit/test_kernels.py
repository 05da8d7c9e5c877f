"""The numba kernels directly: hashing, the index, duplicates, and the pinned init format."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver.arrays import count_nonfinite
from paramserver.init import Uniform
from paramserver.mix import mix64, splitmix64
from paramserver.optim import SGD
from paramserver.server import kernels as k
from paramserver.server.shard import DenseShard, SparseShard

U64 = np.uint64
NO_KEYS = np.empty(0, U64)  # lookup's ``kept``: no copy of the keys


def np_mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer in NumPy (uint64 arrays wrap silently)."""
    z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
    out: np.ndarray = z ^ (z >> U64(31))
    return out


def test_mix64_matches_reference_and_known_value() -> None:
    zs = np.array([0, 1, 2**63, 2**64 - 1, 0x123456789], U64)
    want = np_mix64(zs)
    assert [int(mix64(z)) for z in zs] == want.tolist()
    # splitmix64's first output for seed 0 is mix64(0x9E3779B97F4A7C15) = 0xE220A8397B1DCDAF.
    assert int(mix64(U64(0x9E3779B97F4A7C15))) == 0xE220A8397B1DCDAF
    # the array form: the golden-ratio step after the salt, then the finalizer
    salt = U64(0x5F3759DF2545F491)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(
            splitmix64(zs, salt), np_mix64((zs ^ salt) + U64(0x9E3779B97F4A7C15))
        )


def test_uniform_init_format_is_pinned() -> None:
    """Initial values are part of the checkpoint format: recompute them independently."""
    seed, keys, dim, low, high = 12345, np.array([0, 7, 2**64 - 1], U64), 3, -2.0, 2.0
    golden = U64(0x9E3779B97F4A7C15)
    base = np_mix64(np_mix64(keys) ^ np_mix64(np.array([seed], U64) + golden))
    ctr = (2 * np.arange(dim, dtype=U64) + U64(1)) * golden
    h = np_mix64(base[:, None] + ctr[None, :])
    want = low + (high - low) * ((h >> U64(11)).astype(np.float64) * 2.0**-53)
    got = SparseShard(dim, np.float64, Uniform(low, high), SGD(), seed=seed).pull(keys)
    np.testing.assert_array_equal(got, want)
    dense = DenseShard(3, np.float64, Uniform(low, high), SGD(), seed=seed, offset=2**40).pull()
    dkeys = np.arange(2**40, 2**40 + 3, dtype=U64)
    dbase = np_mix64(np_mix64(dkeys) ^ np_mix64(np.array([seed], U64) + golden))
    dh = np_mix64(dbase + golden)
    np.testing.assert_array_equal(dense, low + (high - low) * ((dh >> U64(11)) * 2.0**-53))


def test_lookup_or_insert_stops_at_max_rows_and_resumes() -> None:
    index = k.new_index(4)
    keys = np.array([10, 11, 10, 12, 13, 11], U64)
    rows = np.full(6, -7, np.int64)
    pos, n = k.lookup_or_insert(index, 0, 2, keys, rows, 0)
    assert (pos, n) == (3, 2)  # key 12 would be the third row
    assert rows[:3].tolist() == [0, 1, 0]
    pos, n = k.lookup_or_insert(index, n, 8, keys, rows, pos)
    assert (pos, n) == (6, 4)
    assert rows.tolist() == [0, 1, 0, 2, 3, 1]
    by_row = np.empty(4, U64)
    k.keys_by_row(index, by_row)
    assert by_row.tolist() == [10, 11, 12, 13]
    found = np.empty(3, np.int64)
    assert k.lookup(index, np.array([13, 99, 10], U64), found, NO_KEYS) == 1
    assert found.tolist() == [3, -1, 0]


def test_index_buckets_are_cache_lines() -> None:
    for buckets in (1, 2, 64, 1 << 16):
        index = k.new_index(buckets)
        assert index.shape == (buckets, 8) and index.ctypes.data % 64 == 0
        assert not index.any()


def test_full_buckets_overflow_into_the_next_and_wrap_around() -> None:
    """Keys beyond a bucket's 5 slots go on to the next bucket, the last one to the first;
    row ids up to INDEX_MAX_ROWS fit."""
    index = k.new_index(2)
    keys = np.arange(9, dtype=U64) * U64(0x9E3779B97F4A7C15)  # 9 of the 10 slots
    rows = np.empty(9, np.int64)
    top = k.INDEX_MAX_ROWS - 9
    assert k.lookup_or_insert(index, top, k.INDEX_MAX_ROWS, keys, rows, 0) == (9, top + 9)
    assert rows.tolist() == list(range(top, top + 9))
    found = np.empty(11, np.int64)
    probe = np.concatenate([keys, np.array([1, 2], U64)])
    assert k.lookup(index, probe, found, NO_KEYS) == 2
    assert found.tolist() == [*range(top, top + 9), -1, -1]
    bigger = k.new_index(4)
    k.rehash(bigger, index)
    assert k.lookup(bigger, probe, found, NO_KEYS) == 2
    assert found.tolist() == [*range(top, top + 9), -1, -1]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=200, unique=True),
    st.integers(0, 3),
)
def test_rehash_finds_every_key(keys_list: list[int], extra: int) -> None:
    keys = np.array(keys_list, U64)
    buckets = 1 << int(np.ceil(np.log2(keys.size / 4.5)) if keys.size > 4 else 0)
    index = k.new_index(buckets)  # up to 90% full: long overflow chains
    rows = np.empty(keys.size, np.int64)
    assert k.lookup_or_insert(index, 0, keys.size, keys, rows, 0) == (keys.size, keys.size)
    bigger = k.new_index(buckets << extra)
    k.rehash(bigger, index)
    found = np.empty(keys.size, np.int64)
    kept = np.zeros(keys.size, U64)
    assert k.lookup(bigger, keys, found, kept if keys.size else NO_KEYS) == 0
    assert found.tolist() == list(range(keys.size))
    assert kept.tolist() == keys_list  # copied in the same pass
    by_row = np.empty(keys.size, U64)
    k.keys_by_row(bigger, by_row)
    assert by_row.tolist() == keys_list


def test_has_duplicates_and_sum_in_order() -> None:
    mark = np.zeros(10, np.uint8)
    assert not k.has_duplicates(np.array([3, 1, 4], np.int64), mark, 1)
    rows = np.array([3, 1, 3, 5, 1, 3], np.int64)
    assert k.has_duplicates(rows, mark, 2)
    grads = np.arange(12, dtype=np.float32).reshape(6, 2)
    urows, ugrads = k.sum_duplicates(rows, grads)
    assert urows.tolist() == [3, 1, 5]
    np.testing.assert_array_equal(ugrads, [[0 + 4 + 10, 1 + 5 + 11], [2 + 8, 3 + 9], [6, 7]])
    assert not k.has_duplicates(np.array([3, 1, 5], np.int64), mark, 3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**40), min_size=1, max_size=300))
def test_sum_duplicates_matches_reference(rows_list: list[int]) -> None:
    rows = np.array(rows_list, np.int64)
    grads = np.random.default_rng(len(rows_list)).normal(size=(rows.size, 3)).astype(np.float32)
    want: dict[int, np.ndarray] = {}
    for r, g in zip(rows_list, grads, strict=True):
        want[r] = want[r] + g if r in want else g.copy()  # in order of occurrence
    urows, ugrads = k.sum_duplicates(rows, grads)
    assert urows.tolist() == list(want)
    np.testing.assert_array_equal(ugrads, np.array(list(want.values())).reshape(-1, 3))


def test_count_nonfinite() -> None:
    a = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, np.finfo(np.float32).max], np.float32)
    assert count_nonfinite(a.view(np.uint32), np.uint32(0x7F800000)) == 3
    b = a.astype(np.float64)
    assert count_nonfinite(b.view(np.uint64), U64(0x7FF0000000000000)) == 3
