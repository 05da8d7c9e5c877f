"""A server's plain state, driven without a process or a socket: the shards (initial rows,
optimizer steps against NumPy), a table's checks and key-list cache, the deferred pulls under
the SSP rule, and the shared state's push dedup and liveness check."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.init import Constant, Uniform
from paramserver.optim import SGD, Adagrad
from paramserver.server.consistency import Clocks, DeferredPulls
from paramserver.server.keycache import KeyCache
from paramserver.server.shard import DenseShard, SparseShard
from paramserver.server.state import ServerState
from paramserver.server.table import make_table
from paramserver.spec import TableSpec
from paramserver.wire.refusal import Refusal

U64 = np.uint64
F32 = np.float32


# ---- shards --------------------------------------------------------------------------------


def test_pull_creates_rows_with_the_initializer() -> None:
    shard = SparseShard(3, "float32", Uniform(-0.5, 0.5), SGD(), seed=11)
    keys = np.array([40, 2, 40, 7], U64)
    rows = shard.pull(keys)
    assert shard.num_rows == 3
    assert ((rows >= -0.5) & (rows < 0.5)).all() and len(np.unique(rows[:, 0])) == 3
    np.testing.assert_array_equal(rows[0], rows[2])  # a repeated key is one row
    # the initial row of a key depends on (seed, key) only: another shard agrees
    other = SparseShard(3, "float32", Uniform(-0.5, 0.5), SGD(), seed=11)
    np.testing.assert_array_equal(other.pull(np.array([7], U64))[0], rows[3])
    const = SparseShard(2, "float64", Constant(0.25), SGD(), seed=0)
    np.testing.assert_array_equal(const.pull(np.array([9], U64)), [[0.25, 0.25]])


def test_sparse_push_applies_adagrad_like_numpy() -> None:
    lr, eps, acc0 = 0.1, 1e-10, 0.1
    shard = SparseShard(2, "float32", Constant(1.0), Adagrad(lr, eps, acc0), seed=0)
    w = {k: np.full(2, 1.0, F32) for k in (3, 5)}
    acc = {k: np.full(2, acc0, F32) for k in (3, 5)}
    rng = np.random.default_rng(0)
    for _ in range(3):
        keys = np.array([3, 5, 3], U64)
        grads = rng.standard_normal((3, 2)).astype(F32)
        shard.push(keys, grads)
        summed = {3: grads[0] + grads[2], 5: grads[1]}  # repeats summed, then one step
        for k, g in summed.items():
            acc[k] = acc[k] + g * g
            w[k] = w[k] - F32(lr) * g / (np.sqrt(acc[k]) + F32(eps))
    got = shard.pull(np.array([3, 5], U64))
    np.testing.assert_allclose(got, np.stack([w[3], w[5]]), rtol=1e-6)


def test_dense_push_applies_sgd_like_numpy() -> None:
    shard = DenseShard(4, "float32", Constant(2.0), SGD(lr=0.5), seed=0, offset=8)
    grad = np.array([1.0, -2.0, 0.0, 4.0], F32)
    mirror = np.empty(4, F32)
    shard.push(grad, out=mirror)  # the values written out in the same pass
    want = np.full(4, 2.0, F32) - F32(0.5) * grad
    np.testing.assert_array_equal(shard.pull(), want)
    np.testing.assert_array_equal(mirror, want)


# ---- key-list cache ------------------------------------------------------------------------


def test_key_cache_is_per_worker_and_drops_the_least_recently_used() -> None:
    cache = KeyCache(entries=2)
    cache.put(0, 7, np.array([3, 1]), False)
    cache.put(1, 7, np.array([4]), True)
    assert cache.get(2, 7) is None  # signatures are per worker
    found = cache.get(0, 7)  # used: now the most recent
    assert found is not None and found[0].tolist() == [3, 1] and found[1] is False
    cache.put(0, 8, np.array([9]), False)  # a third entry: worker 1's goes
    assert cache.get(1, 7) is None
    assert cache.get(0, 7) is not None and cache.get(0, 8) is not None
    assert len(cache) == 2


def sparse_table(**kw: object) -> TableSpec:
    return TableSpec("emb", "sparse", dim=2, optimizer=SGD(lr=1.0), **kw)  # type: ignore[arg-type]


def test_a_signed_key_list_resolves_once_then_by_signature() -> None:
    t = make_table(sparse_table(), rank=0)
    keys = np.array([10, 20, 10], U64)
    h = {"rank": 1, "sig": 99, "create": True}
    rows, dup = t.signed_rows(h, [keys], "pull", "server[0]")
    assert rows.tolist() == [0, 1, 0] and dup
    again, dup2 = t.signed_rows(h, [], "pull", "server[0]")  # no keys: from the cache
    assert again is rows and dup2
    # a push by signature reaches the same rows
    t.signed_rows({**h, "sig": 100}, [keys, np.ones((3, 2), F32)], "push", "server[0]")
    assert isinstance(t.shard, SparseShard) and t.shard.num_rows == 2
    with pytest.raises(Refusal, match="does not know key list 5 of worker\\[1\\]") as err:
        t.signed_rows({**h, "sig": 5}, [], "pull", "server[0]")
    assert err.value.code == "unknown_sig"
    for sig in range(200, 200 + t.keys.entries):  # others push it out of the cache
        t.signed_rows({**h, "sig": sig}, [keys], "pull", "server[0]")
    with pytest.raises(Refusal, match="send the keys again"):
        t.signed_rows(h, [], "pull", "server[0]")


def test_table_checks_refuse_and_change_nothing() -> None:
    t = make_table(sparse_table(max_rows=3), rank=0)
    assert isinstance(t.shard, SparseShard)
    t.shard.pull(np.array([1, 2], U64))
    t.check_room(np.array([1, 2, 3], U64), "server[0]")  # one new key: fits
    with pytest.raises(Refusal, match=r"full on server\[0\].*2 new keys") as err:
        t.check_room(np.array([1, 4, 5], U64), "server[0]")
    assert err.value.code == "full" and t.shard.num_rows == 2
    grads = np.array([[1.0, np.nan], [2.0, 3.0]], F32)
    with pytest.raises(Refusal, match="NaN or Inf") as err:
        t.finite_rows("push", grads)
    assert err.value.code == "non_finite"
    skip = make_table(sparse_table(nonfinite="skip"), rank=0)
    keep = skip.finite_rows("push", grads)
    assert keep is not None and keep.tolist() == [False, True] and skip.skipped == 1


def test_a_dense_table_holds_its_own_range_only() -> None:
    spec = TableSpec("w", "dense", shape=(10,)).with_ranges([(0, 0, 6), (1, 6, 10)])
    mine = make_table(spec, rank=1)
    assert isinstance(mine.shard, DenseShard) and (mine.start, mine.stop) == (6, 10)
    assert mine.shard.num_rows == 4
    assert make_table(spec, rank=2).shard is None


# ---- deferred pulls under ssp --------------------------------------------------------------


def test_an_ssp_pull_waits_for_the_slowest_live_worker() -> None:
    """ssp:2, a pull at clock 5: it waits until the slowest live worker reaches clock 3."""
    clocks = Clocks(3)
    for rank, clock in ((0, 6), (1, 2), (2, 4)):
        clocks.advance(rank, clock)
    waiting: DeferredPulls[str] = DeferredPulls()
    waiting.add("pull@6", "ssp", 2, clock=6, deadline=100.0, now=0.0)
    waiting.add("pull@5", "ssp", 2, clock=5, deadline=100.0, now=0.0)
    assert waiting.release(clocks.min_clock) == [] and len(waiting) == 2
    assert clocks.advance(1, 2) is False  # not ahead: nothing moves
    clocks.advance(1, 3)  # the slowest worker finishes clock 2
    assert waiting.release(clocks.min_clock) == ["pull@5"]
    clocks.advance(1, 5)  # now worker 2, at clock 4, is the slowest
    assert waiting.release(clocks.min_clock) == ["pull@6"] and len(waiting) == 0


def test_a_dead_worker_does_not_hold_a_pull() -> None:
    clocks = Clocks(2)
    clocks.advance(0, 4)  # worker 1 stays at clock 0, then dies
    waiting: DeferredPulls[str] = DeferredPulls()
    waiting.add("pull", "ssp", 1, clock=4, deadline=100.0, now=0.0)
    assert waiting.release(clocks.min_clock) == []
    clocks.set_live({0})  # the view without worker 1
    assert waiting.release(clocks.min_clock) == ["pull"]


def test_sync_and_async_pulls_and_expiry() -> None:
    waiting: DeferredPulls[str] = DeferredPulls()
    waiting.add("sync@3", "sync", 0, clock=3, deadline=10.0, now=1.0)
    waiting.add("ssp@9", "ssp", 1, clock=9, deadline=5.0, now=1.0)
    assert waiting.next_deadline() == 5.0
    assert waiting.release(2) == []  # sync: every update of clocks < 3 first
    late = waiting.expire(6.0)
    assert [d.item for d in late] == ["ssp@9"] and late[0].since == 1.0
    assert waiting.release(3) == ["sync@3"] and waiting.next_deadline() is None


# ---- shared state --------------------------------------------------------------------------


def test_a_retried_push_is_seen_once() -> None:
    state = ServerState()
    assert state.fresh(0, 1) and state.fresh(1, 1) and state.fresh(0, 2)
    assert not state.fresh(0, 2) and not state.fresh(0, 1)


def test_a_worker_that_is_not_live_is_refused() -> None:
    # the wait for the view that lets a worker back is the loop's (Server.park): no sleep here
    state = ServerState()
    state.clocks = Clocks(2)
    state.clocks.set_live({0})
    state.check_live(0)
    with pytest.raises(Refusal, match="worker\\[1\\] is not a live member") as err:
        state.check_live(1)
    assert err.value.code == "not_live"
    with pytest.raises(Refusal, match="table 'x' does not exist on server"):
        state.table("x")


def test_with_replication_a_dense_table_lives_on_its_server_and_the_next() -> None:
    spec = TableSpec("w", "dense", shape=(10,)).with_ranges([(2, 0, 10)])
    # 3 servers, 2 copies: server 2 and server 0 (wrapping around) hold it, server 1 does not
    for rank, holds in ((2, True), (0, True), (1, False)):
        table = make_table(spec, rank, servers=3, replication=2)
        assert (table.shard is not None) == holds, rank
    # on the ring [0, 2, 5] (servers joined and left): server 5's copy is on 5 and then 0
    spec = spec.with_ranges([(5, 0, 10)])
    for rank, holds in ((5, True), (0, True), (2, False)):
        table = make_table(spec, rank, servers=[0, 2, 5], replication=2)
        assert (table.shard is not None) == holds, rank
