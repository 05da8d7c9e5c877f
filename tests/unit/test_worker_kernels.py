"""The worker's compiled kernels against NumPy: np.unique's sets, np.add.at's sums bit for bit,
fancy indexing's copies."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.client.kernels import (
    dedup,
    expand_rows,
    group_by_part,
    place_rows,
    sum_rows_checked,
)


@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_dedup_finds_each_distinct_key_once_in_order_of_first_appearance(n: int) -> None:
    rng = np.random.default_rng(n)
    keys = rng.zipf(1.3, size=n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps
    keys[: n // 3] = np.uint64(2**64 - 1)  # the largest key too
    uniq, inverse = dedup(keys)
    np.testing.assert_array_equal(uniq[inverse], keys)
    np.testing.assert_array_equal(np.sort(uniq), np.unique(keys))
    first = np.unique(keys, return_index=True)[1]
    np.testing.assert_array_equal(uniq, keys[np.sort(first)])
    assert inverse.dtype == np.intp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_rows_adds_repeated_rows_in_batch_order_like_add_at(dtype: type) -> None:
    rng = np.random.default_rng(3)
    inverse = rng.integers(0, 50, size=4000).astype(np.intp)
    grads = rng.standard_normal((4000, 9)).astype(dtype) * 1e3
    expected = np.zeros((60, 9), dtype)
    np.add.at(expected, inverse, grads)  # the reference: one row after another
    got = np.empty((60, 9), dtype)
    assert sum_rows_checked(inverse, grads, got)
    assert got.tobytes() == expected.tobytes()


def test_sum_rows_checked_into_a_reused_buffer_clears_what_it_held() -> None:
    rng = np.random.default_rng(4)
    inverse = rng.integers(0, 30, size=500).astype(np.intp)
    grads = rng.standard_normal((500, 4)).astype(np.float32)
    buf = np.full((30, 4), 7.0, np.float32)  # a previous push's sums
    expected = np.zeros((30, 4), np.float32)
    np.add.at(expected, inverse, grads)
    assert sum_rows_checked(inverse, grads, buf)
    assert buf.tobytes() == expected.tobytes()


@pytest.mark.parametrize("dim", [1, 16, 64, 128])
def test_expand_rows_is_fancy_indexing(dim: int) -> None:
    rng = np.random.default_rng(dim)
    src = rng.standard_normal((300, dim)).astype(np.float32)
    inverse = rng.integers(0, 300, size=2000).astype(np.intp)
    out = np.full((2000, dim), np.nan, np.float32)
    expand_rows(src, inverse, out)
    assert out.tobytes() == src[inverse].tobytes()


def test_group_by_part_then_place_rows_rebuilds_the_list_from_every_part() -> None:
    """Distinct keys split over 3 parts (as routing does), each part's rows placed by the
    grouping: the result is the rows of the whole list, as fancy indexing gives them."""
    rng = np.random.default_rng(9)
    keys = rng.integers(0, 400, size=3000).astype(np.uint64)
    uniq, inverse = dedup(keys)
    owner = rng.integers(0, 3, size=len(uniq))
    idx = [np.flatnonzero(owner == p) for p in range(3)]
    part_of = owner.astype(np.intp)
    row_in_part = np.empty(len(uniq), np.intp)
    for part in idx:
        row_in_part[part] = np.arange(len(part))
    positions, rows, bounds = group_by_part(inverse, part_of, row_in_part, 3)
    assert bounds.tolist() == [0, *np.cumsum(np.bincount(owner[inverse], minlength=3))]
    table = rng.standard_normal((len(uniq), 5))  # the row of each distinct key
    out = np.full((len(keys), 5), np.nan)
    for p in range(3):
        a, b = bounds[p], bounds[p + 1]
        assert np.all(np.diff(positions[a:b]) > 0)  # batch order inside a part
        place_rows(table[idx[p]], rows[a:b], positions[a:b], out)
    assert out.tobytes() == table[inverse].tobytes()


@pytest.mark.parametrize("split", [False, True])
def test_halves_on_two_threads_give_the_one_pass_results(
    split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from paramserver.client import kernels

    monkeypatch.setattr(kernels, "SPLIT_BYTES", 1 if split else 1 << 62)
    monkeypatch.setattr(kernels, "SPLIT_COPY_BYTES", 1 if split else 1 << 62)
    rng = np.random.default_rng(11)
    keys = rng.zipf(1.2, size=20_001).astype(np.uint64)
    uniq, inverse = dedup(keys)
    grads = rng.standard_normal((len(keys), 9)).astype(np.float32)
    want = np.zeros((len(uniq), 9), np.float32)
    np.add.at(want, inverse, grads)  # the reference: in batch order
    got = np.full((len(uniq), 9), np.nan, np.float32)
    assert sum_rows_checked(inverse, grads, got)
    assert got.tobytes() == want.tobytes()
    np.testing.assert_array_equal(expand_rows(want, inverse, np.empty_like(grads)), want[inverse])
    positions = rng.permutation(len(keys)).astype(np.intp)
    out = np.zeros_like(grads)
    place_rows(want, inverse, positions, out)
    np.testing.assert_array_equal(out[positions], want[inverse])


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_rows_checked_in_dedup_order_is_add_at_bit_for_bit_and_says_if_finite(
    split: bool, dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Distinct keys numbered as dedup numbers them (a row's first gradient written, not
    added to zero): the sums of np.add.at into zeros bit for bit, -0.0 gradients included;
    the answer is False exactly when a sum is NaN or Inf (a NaN or Inf gradient anywhere, or
    finite gradients that overflow)."""
    from paramserver.client import kernels

    monkeypatch.setattr(kernels, "SPLIT_BYTES", 1 if split else 1 << 62)
    rng = np.random.default_rng(12)
    keys = rng.zipf(1.2, size=20_001).astype(np.uint64)
    uniq, inverse = dedup(keys)
    grads = rng.standard_normal((len(keys), 9)).astype(dtype)
    grads[rng.random(grads.shape) < 0.2] = -0.0  # 0 + -0.0 is +0.0: kept as add.at has it
    want = np.zeros((len(uniq), 9), dtype)
    np.add.at(want, inverse, grads)
    out = np.full((len(uniq), 9), np.nan, dtype)
    assert sum_rows_checked(inverse, grads, out) is True
    assert out.tobytes() == want.tobytes()
    big = np.finfo(dtype).max
    for i, bad in [(0, np.nan), (len(keys) - 1, np.inf), (len(keys) // 2, -np.inf)]:
        g = grads.copy()
        g[i, 3] = bad
        assert sum_rows_checked(inverse, g, out) is False
    g = grads.copy()
    twice = np.flatnonzero(inverse == inverse[-1])  # the last key's row, repeated
    if len(twice) < 2:
        twice = np.flatnonzero(inverse == 0)
    g[twice[:2], 5] = big  # finite values whose sum overflows
    assert sum_rows_checked(inverse, g, out) is False


def test_sum_rows_checked_zeroes_rows_no_key_went_to_and_takes_any_order() -> None:
    inverse = np.array([0, 2, 0], np.intp)  # row 1 never named: out of dedup's order
    grads = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = np.full((4, 2), 7.0, np.float32)
    assert sum_rows_checked(inverse, grads, out) is True
    assert out.tolist() == [[4.0, 6.0], [0.0, 0.0], [2.0, 3.0], [0.0, 0.0]]
    out = np.full((3, 2), 7.0, np.float32)
    assert sum_rows_checked(np.array([0, 1, 0], np.intp), grads, out) is True
    assert out.tolist() == [[4.0, 6.0], [2.0, 3.0], [0.0, 0.0]]
