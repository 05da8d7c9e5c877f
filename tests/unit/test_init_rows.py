"""Initial values drawn on the servers (Normal from an inverse-CDF table) and the arena
that holds rows (growth without copying), against SciPy/NumPy references."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import special, stats

from paramserver.init import Normal, Uniform
from paramserver.optim import SGD, Adagrad
from paramserver.server.kernels.normal import (
    CELLS,
    EXACT_CELLS,
    ndtri,
    normal_from_bits,
    on_table,
)
from paramserver.server.shard import DenseShard, SparseShard, arena

U64 = np.uint64


def test_ndtri_matches_scipy_into_the_far_tails() -> None:
    p = np.concatenate([10.0 ** -np.arange(1, 300, 7.0), np.linspace(1e-6, 1 - 1e-6, 4001)])
    p = np.concatenate([p, 1 - p[(p < 0.1) & (p > 1e-15)]])  # 1 - p must stay below 1
    got = np.array([ndtri(float(x)) for x in p])
    np.testing.assert_allclose(got, special.ndtri(p), rtol=1e-14, atol=1e-14)


def test_normal_from_bits_is_the_quantile_within_the_interpolation_bound() -> None:
    # Bits spread over every cell, including both exact ends and the cell edges.
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2**53, 20_000, dtype=U64)
    edges = (np.arange(CELLS, dtype=U64) << U64(41)) + U64(7)
    x = np.concatenate([x, edges, np.array([0, 2**53 - 1], U64)])
    got = np.array([normal_from_bits(U64(v)) for v in x])
    upper = x >= U64(2**52)
    below = np.where(upper, U64(2**53 - 1) - x, x).astype(np.float64)  # distance from the end
    want = special.ndtri((below + 0.5) * 2.0**-53) * np.where(upper, -1.0, 1.0)
    assert np.isfinite(got).all()
    cell = (x >> U64(41)).astype(np.int64)
    exact = (cell < EXACT_CELLS) | (cell >= CELLS - EXACT_CELLS)
    np.testing.assert_allclose(got[exact], want[exact], rtol=1e-13)
    assert np.max(np.abs(got[~exact] - want[~exact])) < 5e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normal_rows_pass_a_ks_test_and_have_the_right_moments(dtype: Any) -> None:
    keys = np.arange(25_000, dtype=U64)  # x dim 8 = 200k values
    s = SparseShard(8, dtype, Normal(0.5, 3.0), SGD(), seed=11)
    v = s.pull(keys, create=False).astype(np.float64).ravel()
    z = (v - 0.5) / 3.0
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert abs(z.mean()) < 4 / np.sqrt(z.size) and abs(z.std() - 1.0) < 0.01
    # Tails: draws past 4 sigma at the Gaussian rate (12.7 expected in 200k).
    assert 4 <= np.count_nonzero(np.abs(z) > 4.0) <= 25  # Poisson(12.7): outside is p < 0.01
    # Every column is normal on its own (no column shares a draw with another).
    grid = z.reshape(-1, 8)
    for j in range(8):
        assert stats.kstest(grid[:, j], "norm").pvalue > 0.001
    c = np.corrcoef(grid.T)
    assert np.max(np.abs(c - np.eye(8))) < 0.03


def test_normal_values_depend_on_seed_key_and_column_only() -> None:
    keys = np.array([3, 2**64 - 1, 77], U64)
    a = SparseShard(5, np.float64, Normal(), SGD(), seed=2).pull(keys)
    b = SparseShard(9, np.float64, Normal(), Adagrad(), seed=2, capacity=1).pull(keys[::-1].copy())
    np.testing.assert_array_equal(a, b[::-1, :5])  # a wider row starts with the same columns
    d = DenseShard(4, np.float64, Normal(), SGD(), seed=2, offset=76).pull()
    assert d[1] == a[2, 0]  # dense element i is column 0 of key offset+i


def test_arena_grows_in_place_and_keeps_rows() -> None:
    a = arena.Arena(3, np.float32, capacity=2)
    assert a.reserved
    a.rows[:2] = [[1, 2, 3], [4, 5, 6]]
    before = a.rows.__array_interface__["data"][0]
    a.grow(5000)
    assert a.capacity == 8192 and a.rows.__array_interface__["data"][0] == before
    np.testing.assert_array_equal(a.rows[:2], [[1, 2, 3], [4, 5, 6]])
    a.rows[4999] = 7  # new rows are writable memory
    assert a.rows[4999].tolist() == [7, 7, 7]


def test_arena_past_its_reservation_copies_and_keeps_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arena, "RESERVE_BYTES", 4 * 3 * 8)  # 8 rows reserved
    a = arena.Arena(3, np.float32, capacity=2)
    a.rows[:2] = [[1, 2, 3], [4, 5, 6]]
    a.grow(8)
    assert a.reserved and a.capacity == 8
    a.rows[7] = 9
    a.grow(9)
    assert not a.reserved and a.capacity == 16
    np.testing.assert_array_equal(a.rows[[0, 1, 7]], [[1, 2, 3], [4, 5, 6], [9, 9, 9]])


def test_shard_rows_survive_growth_in_both_arena_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = np.random.default_rng(3).permutation(np.arange(1, 30_001, dtype=U64))
    grads = np.ones((1000, 2))
    shards = []
    for reserve in (arena.RESERVE_BYTES, 1024):
        monkeypatch.setattr(arena, "RESERVE_BYTES", reserve)
        s = SparseShard(2, np.float64, Uniform(), SGD(lr=1.0), seed=4, capacity=4)
        s.push(keys[:1000], grads)
        for part in np.array_split(keys, 9):
            s.pull(part)
        shards.append(s)
    a, b = shards
    assert a._arena.reserved and not b._arena.reserved
    np.testing.assert_array_equal(a.pull(keys), b.pull(keys))
    fresh = SparseShard(2, np.float64, Uniform(), SGD(), seed=4).pull(keys, create=False)
    np.testing.assert_array_equal(a.pull(keys[:1000]), fresh[:1000] - 1.0)
    np.testing.assert_array_equal(a.export()["rows"], b.export()["rows"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normal_rows_in_two_passes_are_init_row_bit_for_bit(dtype: Any) -> None:
    """init_normal_row (columns interpolated without a branch, then the ends computed
    exactly) writes init_row's Normal values, bit for bit, for rows that have end cells and
    rows that have none; as does init_rows, which uses it, and gather_or_init, which does not."""
    from paramserver.server import kernels as k
    from paramserver.server.kernels.rows import init_normal_row, init_row, row_base

    dim, n = 37, 3000
    keys = np.random.default_rng(6).integers(0, 2**64 - 1, n, dtype=U64)
    bits, vals = np.empty(dim, U64), np.empty(dim, np.float64)
    one, two = np.empty((n, dim), dtype), np.empty((n, dim), dtype)
    ends = np.zeros(n, bool)  # whether a row has a column whose cell is at an end
    for i in range(n):
        base = U64(row_base(U64(3), keys[i]))
        init_row(one[i], dim, k.INIT_NORMAL, 0.5, 2.0, base)
        init_normal_row(two[i], dim, 0.5, 2.0, base, bits, vals)
        ends[i] = not all(on_table(U64(x)) for x in bits)
    assert one.tobytes() == two.tobytes()
    assert ends.any() and not ends.all()
    data = np.zeros((n, dim), dtype)
    z = dtype(0)
    out = np.full((n, dim), np.nan, dtype)
    k.init_rows(
        data, keys, np.arange(n), 0, dim, U64(3), k.INIT_NORMAL, 0.5, 2.0, 0, z, z, z, z, out
    )
    assert data.tobytes() == one.tobytes() and out.tobytes() == one.tobytes()
    peek = np.empty((n, dim), dtype)
    k.gather_or_init(data, np.full(n, -1), keys, peek, U64(3), k.INIT_NORMAL, 0.5, 2.0)
    assert peek.tobytes() == one.tobytes()
