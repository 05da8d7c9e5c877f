"""SparseShard and DenseShard: storage semantics, determinism, validation, export/load."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paramserver.arrays import all_finite
from paramserver.errors import ConfigError
from paramserver.init import Constant, Normal, Uniform, Zeros
from paramserver.optim import FTRL, SGD, Adagrad, Adam, Momentum, Optimizer
from paramserver.server.shard import DenseShard, SparseShard

U64 = np.uint64
EDGE_KEYS = np.array([0, 1, 2**63, 2**64 - 1], U64)


def sparse(dim: int = 4, opt: Optimizer | None = None, **kw: Any) -> SparseShard:
    kw.setdefault("dtype", np.float32)
    kw.setdefault("init", Normal(std=0.1))
    kw.setdefault("seed", 42)
    return SparseShard(dim=dim, optimizer=opt or Adagrad(lr=0.1), **kw)


# ----------------------------------------------------------------------------- pull / push


def test_pull_creates_rows_and_repeats_share_them() -> None:
    s = sparse()
    keys = np.array([5, 9, 5, 0], U64)
    w = s.pull(keys)
    assert w.shape == (4, 4) and w.dtype == np.float32
    np.testing.assert_array_equal(w[0], w[2])
    assert s.num_rows == 3
    assert s.contains(np.array([5, 9, 0, 6], U64)).tolist() == [True, True, True, False]


def test_pull_without_create_returns_init_and_stores_nothing() -> None:
    s = sparse()
    keys = np.array([3, 2**64 - 1, 3], U64)
    w = s.pull(keys, create=False)
    assert s.num_rows == 0
    assert not s.contains(keys).any()
    np.testing.assert_array_equal(w, s.pull(keys))  # the rows created later are the same
    assert s.num_rows == 2
    # Stored rows are served as stored, missing ones as initialized, in one call.
    s.push(keys[:1], np.ones((1, 4), np.float32))
    mixed = s.pull(np.array([3, 77], U64), create=False)
    np.testing.assert_array_equal(mixed[0], s.pull(keys[:1])[0])
    np.testing.assert_array_equal(mixed[1], sparse().pull(np.array([77], U64))[0])
    assert s.num_rows == 2


def test_pull_into_out() -> None:
    s = sparse()
    out = np.empty((3, 4), np.float32)
    res = s.pull(np.array([1, 2, 3], U64), out=out)
    assert res is out
    with pytest.raises(ConfigError, match=r"out: expected .*float32.*\(3, 4\).*got float64"):
        s.pull(np.array([1, 2, 3], U64), out=np.empty((3, 4)))
    with pytest.raises(ConfigError, match="C-contiguous"):
        s.pull(np.array([1, 2], U64), out=np.empty((4, 2), np.float32).T)


def test_push_creates_missing_rows_then_updates() -> None:
    s = sparse(opt=SGD(lr=1.0), init=Constant(0.5))
    s.push(np.array([8, 8, 8], U64), np.ones((3, 4), np.float32))
    assert s.num_rows == 1
    np.testing.assert_array_equal(s.pull(np.array([8], U64)), [[-2.5] * 4])


def test_empty_push_and_pull() -> None:
    s = sparse()
    s.push(np.array([], U64), np.empty((0, 4), np.float32))
    assert s.pull(np.array([], U64)).shape == (0, 4)
    assert s.num_rows == 0


def test_duplicates_are_summed_in_order_of_occurrence() -> None:
    # In float32, (1e8 + 1) - 1e8 + ... depends on the order; the sum must follow the push.
    s = sparse(dim=1, opt=SGD(lr=1.0), init=Zeros())
    g = np.array([[1e8], [1.0], [-1e8], [1.0]], np.float32)
    s.push(np.array([1, 1, 1, 1], U64), g)
    want = -(((np.float32(1e8) + np.float32(1)) + np.float32(-1e8)) + np.float32(1))
    assert s.pull(np.array([1], U64))[0, 0] == want


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("keys", "grads", "match"),
    [
        (np.array([1, 2], np.int64), np.zeros((2, 4), np.float32), "shard: keys must be a 1-D uint64 array, got int64"),
        (np.array([[1, 2]], U64), np.zeros((2, 4), np.float32), r"shard: keys .*got uint64 array of shape \(1, 2\)"),
        ([1, 2], np.zeros((2, 4), np.float32), "shard: keys .*got list"),
        (np.array([1, 2], U64), np.zeros((2, 4), np.float64), r"grads: expected a float32 array of shape \(2, 4\), got float64"),
        (np.array([1, 2], U64), np.zeros((2, 3), np.float32), r"grads: .*got float32 array of shape \(2, 3\)"),
        (np.array([1, 2], U64), np.zeros((3, 4), np.float32), r"got float32 array of shape \(3, 4\)"),
        (np.array([1, 2], U64), "nope", "grads: .*got str"),
    ],
)  # fmt: skip
def test_push_errors_name_expected_and_got_and_change_nothing(
    keys: Any, grads: Any, match: str
) -> None:
    s = sparse()
    s.push(np.array([1, 5], U64), np.ones((2, 4), np.float32))
    before = s.export()
    with pytest.raises(ConfigError, match=match):
        s.push(keys, grads)
    after = s.export()
    np.testing.assert_array_equal(before["keys"], after["keys"])
    np.testing.assert_array_equal(before["rows"], after["rows"])


def test_pull_and_load_errors_change_nothing() -> None:
    s = sparse()
    s.pull(np.array([1], U64))
    with pytest.raises(ConfigError, match="keys"):
        s.pull(np.array([1.0, 2.0]))
    with pytest.raises(ConfigError, match=r"rows: expected a float32 array of shape \(2, 8\)"):
        s.load(np.array([7, 8], U64), np.zeros((2, 4), np.float32))
    assert s.num_rows == 1
    d = DenseShard(5, np.float64, Zeros(), SGD(), seed=0)
    with pytest.raises(
        ConfigError, match=r"grad: expected a float64 array of shape \(5,\), got float32"
    ):
        d.push(np.zeros(5, np.float32))
    with pytest.raises(ConfigError, match=r"got float64 array of shape \(4,\)"):
        d.push(np.zeros(4))
    assert (d.pull() == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, "dim"),
        ({"dim": 2.0}, "dim"),
        ({"dtype": np.int32}, "dtype: expected float32 or float64, got int32"),
        ({"dtype": "float16"}, "dtype"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"capacity": 0}, "capacity"),
        ({"init": "normal"}, "init"),
        ({"optimizer": "sgd"}, "optimizer"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "dim": 2,
        "dtype": np.float32,
        "init": Zeros(),
        "optimizer": SGD(),
        "seed": 0,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        SparseShard(**args)


def test_dense_constructor_errors() -> None:
    with pytest.raises(ConfigError, match="size"):
        DenseShard(0, np.float32, Zeros(), SGD(), seed=0)
    with pytest.raises(ConfigError, match="offset"):
        DenseShard(3, np.float32, Zeros(), SGD(), seed=0, offset=-1)


# ----------------------------------------------------------------------------- determinism


def test_initial_rows_do_not_depend_on_capacity_or_order() -> None:
    keys = np.concatenate([EDGE_KEYS, np.arange(2, 3000, 7, dtype=U64)])
    a = sparse(capacity=1).pull(keys)
    b_shard = sparse(capacity=100_000)
    b_shard.pull(keys[::-1].copy())
    b = b_shard.pull(keys)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sparse(seed=43).pull(keys))  # the seed matters


def test_shards_with_key_subsets_agree_with_one_shard() -> None:
    keys = np.random.default_rng(0).integers(0, 2**64 - 1, 5000, dtype=U64, endpoint=True)
    whole = sparse(dim=3).pull(keys)
    owner = keys % U64(3)
    for part in range(3):
        sel = owner == part
        np.testing.assert_array_equal(sparse(dim=3).pull(keys[sel]), whole[sel])


@pytest.mark.parametrize("init", [Normal(0.0, 1.0), Uniform(-1.0, 1.0), Constant(0.25)])
def test_dense_ranges_concatenate_to_the_whole_table(init: Any) -> None:
    whole = DenseShard(1000, np.float64, init, Adam(), seed=9).pull()
    for cuts in ([0, 1000], [0, 1, 999, 1000], [0, 333, 334, 700, 1000]):
        parts = [
            DenseShard(hi - lo, np.float64, init, Adam(), seed=9, offset=lo).pull()
            for lo, hi in itertools.pairwise(cuts)
        ]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_dense_element_equals_sparse_column_zero() -> None:
    d = DenseShard(50, np.float32, Normal(), SGD(), seed=4).pull()
    s = SparseShard(3, np.float32, Normal(), SGD(), seed=4).pull(np.arange(50, dtype=U64))
    np.testing.assert_array_equal(d, s[:, 0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_statistics(dtype: Any) -> None:
    keys = np.arange(12_500, dtype=U64)  # x dim 8 = 100k values
    n = SparseShard(8, dtype, Normal(1.0, 2.0), SGD(), seed=1).pull(keys, create=False).ravel()
    assert abs(n.mean() - 1.0) < 0.03 and abs(n.std() - 2.0) < 0.03
    assert abs(float(np.mean(np.abs(n - 1.0) < 2.0)) - 0.6827) < 0.01  # shaped like a Gaussian
    u = SparseShard(8, dtype, Uniform(-1.0, 3.0), SGD(), seed=1).pull(keys, create=False).ravel()
    assert u.min() >= -1.0 and u.max() <= 3.0
    assert abs(u.mean() - 1.0) < 0.02 and abs(u.std() - 4 / np.sqrt(12)) < 0.02
    # Neighbouring columns and keys are not correlated.
    grid = n.reshape(-1, 8)
    assert abs(np.corrcoef(grid[:, 0], grid[:, 1])[0, 1]) < 0.03
    assert abs(np.corrcoef(grid[:-1, 0], grid[1:, 0])[0, 1]) < 0.03
    dn = DenseShard(100_000, dtype, Normal(0.0, 1.0), SGD(), seed=1).pull()
    assert abs(dn.mean()) < 0.02 and abs(dn.std() - 1.0) < 0.02


def test_optimizer_state_starts_right() -> None:
    s = sparse(dim=2, opt=Adagrad(initial_accumulator=0.5), init=Zeros())
    s.pull(np.array([1], U64))
    np.testing.assert_array_equal(s.export()["rows"], [[0, 0, 0.5, 0.5]])
    a = sparse(dim=2, opt=Adam(), init=Constant(1.0))
    a.pull(np.array([1], U64))
    np.testing.assert_array_equal(a.export()["rows"], [[1, 1, 0, 0, 0, 0, 0]])


# ----------------------------------------------------------------------------- growth


def test_index_growth_keeps_every_row() -> None:
    rng = np.random.default_rng(7)
    keys = np.unique(rng.integers(0, 2**64 - 1, 200_000, dtype=U64, endpoint=True))
    keys = np.concatenate([EDGE_KEYS, keys[~np.isin(keys, EDGE_KEYS)]])
    rng.shuffle(keys)
    s = SparseShard(2, np.float64, Uniform(), SGD(lr=1.0), seed=3, capacity=16)
    first = s.pull(keys[:1000])
    g = np.ones((1000, 2))
    s.push(keys[:1000], g)  # these rows must survive the growth below
    for chunk in np.array_split(keys, 7):
        s.pull(chunk)
    assert s.num_rows == keys.size
    assert s.contains(keys).all()
    assert not s.contains(
        np.array([k for k in range(2, 64) if k not in set(keys.tolist())], U64)
    ).any()
    np.testing.assert_array_equal(s.pull(keys[:1000]), first - 1.0)
    fresh = SparseShard(2, np.float64, Uniform(), SGD(), seed=3)
    np.testing.assert_array_equal(s.pull(keys[1000:]), fresh.pull(keys[1000:], create=False))
    buckets = s._index.shape[0]
    assert s.nbytes == s.capacity * (2 * 8 + 1) + buckets * 64
    assert 2 * buckets < s.num_rows <= 4 * buckets  # doubled when 4 rows a bucket
    np.testing.assert_array_equal(s.export()["keys"][:1000], keys[:1000])  # insertion order


def test_rows_past_the_row_id_limit_are_refused_and_nothing_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Row ids are 32-bit (``INDEX_MAX_ROWS``, lowered here): a request that would create
    more rows is refused whole, one that fits exactly is served."""
    from paramserver.server import kernels

    monkeypatch.setattr(kernels, "INDEX_MAX_ROWS", 50)
    s = SparseShard(1, np.float32, Zeros(), SGD(lr=1.0), seed=0, capacity=4)
    s.push(np.arange(40, dtype=U64), np.ones((40, 1), np.float32))
    with pytest.raises(ConfigError, match="11 new rows would take this shard past the 50"):
        s.push(np.arange(29, 51, dtype=U64), np.ones((22, 1), np.float32))
    with pytest.raises(ConfigError, match="past the 50"):
        s.pull(np.arange(35, 60, dtype=U64))
    assert s.num_rows == 40
    np.testing.assert_array_equal(s.pull(np.arange(40, dtype=U64))[:, 0], -np.ones(40))
    s.push(np.arange(30, 50, dtype=U64), np.ones((20, 1), np.float32))  # exactly 50 rows
    assert s.num_rows == 50
    assert (
        s.pull(np.arange(50, dtype=U64))[:, 0].tolist() == [-1.0] * 30 + [-2.0] * 10 + [-1.0] * 10
    )


def test_duplicates_found_across_stamp_wraps() -> None:
    """The duplicate marks are a byte a row with a stamp that wraps every 255 pushes:
    duplicates are summed and distinct keys are not, before and after the wraps."""
    s = SparseShard(1, np.float64, Zeros(), SGD(lr=1.0), seed=0)
    keys = np.arange(10, dtype=U64)
    want = np.zeros(10)
    for i in range(700):
        batch = keys[[i % 10, (i + 1) % 10, (i + 3) % 10]]
        if i % 7 == 0:
            batch[2] = batch[0]  # a duplicate
        _, dup = s.resolve(batch)
        assert dup == (i % 7 == 0)
        s.push(batch, np.ones((3, 1)))
        np.add.at(want, batch.astype(np.int64), -1.0)
    np.testing.assert_array_equal(s.pull(keys)[:, 0], want)


# ----------------------------------------------------------------------------- export / load


@pytest.mark.parametrize("opt", [Adam(lr=0.1), FTRL(l1=0.01), Momentum()])
def test_sparse_export_load_round_trip(opt: Optimizer) -> None:
    rng = np.random.default_rng(5)
    a = sparse(dim=3, opt=opt, dtype=np.float64)
    keys = np.array([0, 5, 2**64 - 1, 5], U64)
    a.push(keys, rng.standard_normal((4, 3)))
    snap = a.export()
    assert snap["keys"].tolist() == [0, 5, 2**64 - 1]
    assert snap["rows"].shape == (3, 3 * (1 + opt.n_slots) + opt.n_scalars)
    b = sparse(dim=3, opt=opt, dtype=np.float64, capacity=1)
    b.pull(np.array([5, 77], U64))  # a stale row 5 gets replaced; row 77 stays
    b.load(**snap)
    assert b.num_rows == 4
    np.testing.assert_array_equal(b.pull(keys), a.pull(keys))
    # The optimizer state came along: the next push gives the same result on both.
    g = rng.standard_normal((4, 3))
    a.push(keys, g)
    b.push(keys, g)
    np.testing.assert_array_equal(b.pull(keys), a.pull(keys))
    snap["rows"][:] = 0  # export is a copy
    assert (a.pull(keys) != 0).any()


def test_dense_export_load_recut() -> None:
    rng = np.random.default_rng(6)
    opt = Adam(lr=0.05)
    parts = [
        DenseShard(n, np.float32, Normal(), opt, seed=1, offset=o) for o, n in [(0, 4), (4, 6)]
    ]
    for _ in range(3):
        g = rng.standard_normal(10).astype(np.float32)
        parts[0].push(g[:4])
        parts[1].push(g[4:])
    rows = np.concatenate([p.export()["rows"] for p in parts])
    assert rows.shape == (10, 4)
    assert (rows[:, 3] == 3).all()  # Adam's step, per element
    whole = DenseShard(10, np.float32, Zeros(), opt, seed=2)
    whole.load(rows)
    np.testing.assert_array_equal(whole.pull(), np.concatenate([p.pull() for p in parts]))
    np.testing.assert_array_equal(whole.export()["rows"], rows)
    bad = rows.copy()
    bad[0, 3] = 7
    with pytest.raises(ConfigError, match="step"):
        whole.load(bad)
    np.testing.assert_array_equal(whole.export()["rows"], rows)


def test_dense_pull_out_and_nbytes() -> None:
    d = DenseShard(8, np.float32, Constant(3.0), Adagrad(), seed=0)
    out = np.empty(8, np.float32)
    assert d.pull(out) is out and (out == 3).all()
    assert d.nbytes == 8 * 2 * 4 and d.num_rows == 8
    with pytest.raises(ConfigError, match="out"):
        d.pull(np.empty(8))


# ----------------------------------------------------------------------------- all_finite


def test_all_finite() -> None:
    for dtype in (np.float32, np.float64):
        a = np.ones((30, 7), dtype)
        assert all_finite(a) and all_finite(a.T) and all_finite(a[:, ::2])
        assert all_finite(np.empty(0, dtype))
        for bad in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b[29, 6] = bad
            assert not all_finite(b) and not all_finite(b.T) and not all_finite(b[:, ::2])
        c = a.copy()
        c[0, 0] = np.finfo(dtype).max  # largest finite, exponent not all ones
        assert all_finite(c)
    assert all_finite(np.arange(5))
    assert not all_finite(np.array([1, np.nan], np.float16))


# ----------------------------------------------------------------------------- model check

KEY_POOL = [0, 1, 2, 3, 1000, 2**32, 2**63, 2**64 - 1]
keys_st = st.lists(st.sampled_from(KEY_POOL), max_size=12).map(lambda ks: np.array(ks, U64))
op_st = st.one_of(
    st.tuples(st.just("pull"), keys_st, st.booleans()),
    st.tuples(st.just("push"), keys_st, st.integers(0, 2**32 - 1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, max_size=25), capacity=st.sampled_from([1, 2, 1024]))
def test_random_ops_match_dict_model(ops: list[tuple[str, np.ndarray, Any]], capacity: int) -> None:
    dim, lr = 3, 0.5
    shard = SparseShard(dim, np.float64, Normal(), SGD(lr=lr), seed=8, capacity=capacity)
    oracle = SparseShard(dim, np.float64, Normal(), SGD(lr=lr), seed=8)
    model: dict[int, np.ndarray] = {}

    def init(key: int) -> np.ndarray:
        row: np.ndarray = oracle.pull(np.array([key], U64), create=False)[0]
        return row

    for op, keys, arg in ops:
        if op == "pull":
            got = shard.pull(keys, create=arg)
            want = [model[k] if k in model else init(k) for k in keys.tolist()]
            np.testing.assert_array_equal(got, np.array(want).reshape(-1, dim))
            if arg:
                for k in keys.tolist():
                    model.setdefault(k, init(k))
        else:
            grads = np.random.default_rng(arg).standard_normal((keys.size, dim))
            summed: dict[int, np.ndarray] = {}
            for k, g in zip(keys.tolist(), grads, strict=True):
                summed[k] = summed[k] + g if k in summed else g.copy()
            for k, g in summed.items():
                model[k] = model.get(k, init(k)) - lr * g
            shard.push(keys, grads)
        assert shard.num_rows == len(model)
    if model:
        keys = np.array(list(model), U64)
        np.testing.assert_array_equal(shard.pull(keys), np.stack([model[k] for k in model]))
        assert shard.export()["keys"].tolist() == list(model)  # insertion order
