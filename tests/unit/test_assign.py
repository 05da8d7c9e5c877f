"""SparseShard.assign and DenseShard.assign: rows written in place of the table's, the
optimizer state reset to a new row's (or set), checked against NumPy optimizer math."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.errors import ConfigError
from paramserver.init import Normal
from paramserver.optim import FTRL, SGD, Adagrad, Adam, Momentum, Optimizer
from paramserver.server.shard import DenseShard, SparseShard

U64 = np.uint64
OPTIMIZERS = [
    SGD(lr=0.1),
    Momentum(lr=0.1, momentum=0.9),
    Adagrad(lr=0.1, initial_accumulator=0.1),
    Adam(lr=0.1),
    FTRL(alpha=0.1, beta=1.0, l1=0.01, l2=0.1),
]


def _sparse(opt: Optimizer, dim: int = 3) -> SparseShard:
    return SparseShard(dim, np.float32, Normal(std=0.5), opt, seed=3)


def test_assign_sets_rows_and_creates_missing_ones_the_last_repeat_wins() -> None:
    s = _sparse(SGD())
    s.pull(np.array([1, 2], U64))
    keys = np.array([2, 7, 2], U64)
    rows = np.arange(9, dtype=np.float32).reshape(3, 3)
    s.assign(keys, rows)
    got = s.pull(np.array([1, 2, 7], U64), create=False)
    np.testing.assert_array_equal(got[1], rows[2])  # key 2: its last row
    np.testing.assert_array_equal(got[2], rows[1])
    assert s.num_rows == 3  # key 1 kept, key 7 created


def test_adagrad_state_starts_afresh_after_assign() -> None:
    """A row that was trained, then assigned: its next step is the first step of a new row
    (accumulator = initial_accumulator + g^2), computed in NumPy."""
    opt = Adagrad(lr=0.1, initial_accumulator=0.1)
    s = _sparse(opt)
    keys = np.array([4, 5], U64)
    for _ in range(3):
        s.push(keys, np.full((2, 3), 2.0, np.float32))
    values = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], np.float32)
    s.assign(keys, values)
    g = np.array([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]], np.float32)
    s.push(keys, g)
    acc = 0.1 + g.astype(np.float64) ** 2
    want = values - 0.1 * g / (np.sqrt(acc) + opt.eps)
    np.testing.assert_allclose(s.pull(keys), want, rtol=1e-6)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.kind)
def test_a_zero_gradient_after_assign_keeps_the_assigned_values(opt: Optimizer) -> None:
    """With a reset state a zero gradient moves nothing, for every optimizer (FTRL's z is
    recomputed from the assigned weights, as for a new row)."""
    s = _sparse(opt)
    keys = np.array([10, 11, 12], U64)
    s.push(keys, np.ones((3, 3), np.float32))
    values = np.array([[0.3, -0.2, 0.0], [1.5, 2.0, -3.0], [0.05, -0.05, 0.8]], np.float32)
    s.assign(keys, values)
    s.push(keys, np.zeros((3, 3), np.float32))
    np.testing.assert_allclose(s.pull(keys), values, rtol=1e-5, atol=1e-6)


def test_assign_of_whole_rows_sets_the_state_as_exported() -> None:
    a, b = _sparse(Adam(lr=0.05)), _sparse(Adam(lr=0.05))
    keys = np.array([1, 2, 3], U64)
    for i in range(3):
        a.push(keys, np.full((3, 3), i + 1.0, np.float32))
    b.push(keys, np.ones((3, 3), np.float32))  # other values, other state
    saved = a.export()
    b.assign(saved["keys"], saved["rows"])
    g = np.full((3, 3), 0.7, np.float32)
    a.push(keys, g)
    b.push(keys, g)
    np.testing.assert_array_equal(b.export()["rows"], a.export()["rows"])


def test_bad_assign_is_refused_and_changes_nothing() -> None:
    s = _sparse(Adagrad())
    keys = np.array([1, 2], U64)
    s.push(keys, np.ones((2, 3), np.float32))
    before = s.export()
    for bad in (
        np.zeros((2, 3), np.float64),  # dtype
        np.zeros((2, 4), np.float32),  # neither dim nor stride wide
        np.zeros((3, 3), np.float32),  # rows for other keys
        [[0.0] * 3] * 2,  # not an array
    ):
        with pytest.raises(ConfigError):
            s.assign(keys, bad)  # type: ignore[arg-type]
    after = s.export()
    np.testing.assert_array_equal(after["keys"], before["keys"])
    np.testing.assert_array_equal(after["rows"], before["rows"])


def test_dense_assign_resets_adam_then_steps_as_numpy() -> None:
    opt = Adam(lr=0.1)
    d = DenseShard(4, np.float32, Normal(), opt, seed=1, offset=6)
    for _ in range(3):
        d.push(np.ones(4, np.float32))
    values = np.array([1.0, -1.0, 0.5, 2.0], np.float32)
    d.assign(values)
    np.testing.assert_array_equal(d.pull(), values)
    g = np.array([0.5, -2.0, 1.0, 0.0], np.float32)
    d.push(g)
    # Adam's first step (step 1, bias-corrected): lr * g / (|g| + eps)
    want = values - 0.1 * g / (np.abs(g) + opt.eps)
    np.testing.assert_allclose(d.pull(), want, rtol=1e-5, atol=1e-7)


def test_dense_assign_of_exported_rows_and_bad_values() -> None:
    a = DenseShard(3, np.float32, Normal(), Momentum(lr=0.1), seed=1)
    b = DenseShard(3, np.float32, Normal(), Momentum(lr=0.1), seed=2)
    a.push(np.ones(3, np.float32))
    b.assign(a.export()["rows"])
    a.push(np.ones(3, np.float32))
    b.push(np.ones(3, np.float32))
    np.testing.assert_array_equal(b.pull(), a.pull())
    before = b.export()["rows"]
    for bad in (np.zeros(4, np.float32), np.zeros(3, np.float64), np.zeros((3, 3), np.float32)):
        with pytest.raises(ConfigError):
            b.assign(bad)
    np.testing.assert_array_equal(b.export()["rows"], before)
