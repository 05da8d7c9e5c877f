"""Sparse and dense tables through a real local cluster, checked against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import RemoteError

pytestmark = pytest.mark.timeout(60)


def test_sparse_sgd_matches_numpy_with_repeated_keys(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    emb = client.sparse_table(
        "emb", dim=3, init=ps.init.Constant(1.0), optimizer=ps.optim.SGD(lr=0.5)
    )
    rng = np.random.default_rng(0)
    ref: dict[int, np.ndarray] = {}
    for _ in range(20):
        keys = rng.integers(0, 2**64 - 1, size=50, dtype=np.uint64)
        keys[:10] = keys[10:20]  # repeats inside one push
        rows = emb.pull(keys)
        for i, k in enumerate(keys.tolist()):
            np.testing.assert_array_equal(rows[i], ref.get(k, np.ones(3, np.float32)))
        grads = rng.standard_normal((50, 3)).astype(np.float32)
        emb.push(keys, grads).result()
        summed: dict[int, np.ndarray] = {}
        for k, g in zip(keys.tolist(), grads, strict=True):
            summed[k] = summed[k] + g if k in summed else g.copy()
        for k, g in summed.items():
            ref[k] = ref.get(k, np.ones(3, np.float32)) - np.float32(0.5) * g
    stats = client.stats()
    assert sum(s["tables"]["emb"]["rows"] for s in stats) == len(ref)
    assert all(s["tables"]["emb"]["rows"] > 0 for s in stats), (
        "keys were not spread over both servers"
    )


def test_pull_keeps_shape_and_order(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    emb = client.sparse_table("shaped", dim=2, init=ps.init.Normal(std=1.0))
    keys = np.array([[5, 9, 5], [1, 9, 0]], dtype=np.int64)
    rows = emb.pull(keys)
    assert rows.shape == (2, 3, 2)
    np.testing.assert_array_equal(rows[0, 0], rows[0, 2])
    np.testing.assert_array_equal(rows[0, 1], rows[1, 1])
    single = emb.pull(np.array([9], dtype=np.uint64))
    np.testing.assert_array_equal(single[0], rows[0, 1])


def test_initial_rows_do_not_depend_on_the_number_of_servers() -> None:
    keys = np.arange(0, 5000, 7, dtype=np.uint64)
    pulled = []
    for servers in (1, 3):
        with ps.LocalCluster(servers=servers, workers=1) as c:
            t = c.connect().sparse_table("same", dim=4, init=ps.init.Normal(std=0.1), seed=1234)
            pulled.append(t.pull(keys))
    np.testing.assert_array_equal(pulled[0], pulled[1])
    assert pulled[0].std() > 0.05


def test_pull_without_create_stores_nothing(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    emb = client.sparse_table("eval", dim=4, init=ps.init.Uniform(-1, 1))
    keys = np.arange(100, dtype=np.uint64)
    probe = emb.pull(keys, create=False)
    assert sum(s["tables"]["eval"]["rows"] for s in client.stats()) == 0
    created = emb.pull(keys)
    np.testing.assert_array_equal(probe, created)
    assert sum(s["tables"]["eval"]["rows"] for s in client.stats()) == 100


def test_dense_small_and_split_tables(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    small = client.dense_table(
        "small", shape=(3, 4), init=ps.init.Constant(2.0), optimizer=ps.optim.SGD(lr=0.25)
    )
    assert len(small.spec.ranges) == 1
    big = client.dense_table(
        "big", shape=(600_000,), init=ps.init.Normal(std=0.01), optimizer=ps.optim.Adam(lr=0.01)
    )
    assert [r[0] for r in big.spec.ranges] == [0, 1], "a large table is split over both servers"
    g = np.arange(12, dtype=np.float32).reshape(3, 4)
    small.push(g).result()
    np.testing.assert_array_equal(small.pull(), np.float32(2.0) - np.float32(0.25) * g)
    w0 = big.pull()
    gb = np.random.default_rng(1).standard_normal(600_000).astype(np.float32)
    big.push(gb).result()
    # Adam's first step: m_hat = g, v_hat = g*g, so each weight moves by lr * g / (|g| + eps)
    step = w0.astype(np.float64) - big.pull()
    g64 = gb.astype(np.float64)
    np.testing.assert_allclose(step, 0.01 * g64 / (np.abs(g64) + 1e-8), rtol=1e-3, atol=1e-8)


def test_set_lr_changes_the_step(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    d = client.dense_table("lr", shape=(4,), optimizer=ps.optim.SGD(lr=1.0))
    d.push(np.ones(4, np.float32)).result()
    d.set_lr(0.125)
    d.push(np.ones(4, np.float32)).result()
    np.testing.assert_array_equal(d.pull(), np.full(4, -1.125, np.float32))


def test_create_is_idempotent_and_conflicts_are_refused(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    a = client.sparse_table("t", dim=8, optimizer=ps.optim.Adagrad(lr=0.1))
    a.push(np.array([1], np.uint64), np.ones((1, 8), np.float32)).result()
    b = client.sparse_table("t", dim=8, optimizer=ps.optim.Adagrad(lr=0.1))
    np.testing.assert_array_equal(a.pull(np.array([1])), b.pull(np.array([1])))
    with pytest.raises(RemoteError, match=r"'t' already exists with a different dim"):
        client.sparse_table("t", dim=16, optimizer=ps.optim.Adagrad(lr=0.1))
    with pytest.raises(RemoteError, match="optimizer"):
        client.sparse_table("t", dim=8, optimizer=ps.optim.SGD(lr=0.1))
    assert [s.name for s in client.tables()] == ["t"]


def test_pull_async_overlaps_and_staleness_is_recorded(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    emb = client.sparse_table("async", dim=2)
    futures = [emb.pull_async(np.arange(i, i + 10)) for i in range(5)]
    assert all(f.result().shape == (10, 2) for f in futures)
    assert emb.staleness() == {0: 5}


def test_ftrl_weights_are_exactly_zero_under_l1(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    t = client.sparse_table("ftrl", dim=1, optimizer=ps.optim.FTRL(alpha=0.1, l1=10.0))
    keys = np.arange(50, dtype=np.uint64)
    t.push(keys, np.full((50, 1), 0.5, np.float32)).result()
    assert np.count_nonzero(t.pull(keys)) == 0


def test_evaluation_pulls_of_a_cached_key_list_create_nothing(cluster: ps.LocalCluster) -> None:
    # a key list pulled and pushed again and again is cached on the servers (key signatures);
    # an evaluation pull of the same list must still work and must still create nothing
    client = cluster.connect()
    emb = client.sparse_table("cached", dim=2, optimizer=ps.optim.SGD(lr=1.0))
    keys = np.arange(30, dtype=np.uint64)
    for _ in range(5):
        emb.pull(keys)
        emb.push(keys, np.ones((30, 2), np.float32)).result()
    np.testing.assert_array_equal(emb.pull(keys, create=False), np.full((30, 2), -5.0, np.float32))
    unseen = np.arange(1000, 1030, dtype=np.uint64)
    for _ in range(4):
        emb.pull(unseen, create=False)
    assert sum(s["tables"]["cached"]["rows"] for s in client.stats()) == 30


@pytest.mark.parametrize("consistency", ["sync", "ssp:1", "async"])
def test_the_same_key_list_every_step_in_every_mode(
    cluster: ps.LocalCluster, consistency: str
) -> None:
    # the same feature block each step: pulls get a server-side signature after a few steps,
    # and pushes must keep working whatever the consistency
    client = cluster.connect()
    t = client.sparse_table(
        f"fixed-{consistency.replace(':', '-')}",
        dim=2,
        optimizer=ps.optim.SGD(lr=1.0),
        consistency=consistency,
    )
    keys = np.array([5, 9, 5, 70, 3], dtype=np.uint64)
    for _ in range(6):
        t.pull(keys)
        t.push(keys, np.ones((5, 2), np.float32)).result()
        client.clock()
    expect = -6 * np.array([2, 1, 2, 1, 1], np.float32)[:, None] * np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(t.pull(keys, create=False), expect)


@pytest.mark.parametrize("codec", ["float16", "bfloat16", "int8"])
def test_codec_pulls_match_numpy(cluster: ps.LocalCluster, codec: str) -> None:
    from paramserver.wire.codec import decode_rows, encode_rows

    client = cluster.connect()
    emb = client.sparse_table(
        f"emb_{codec}",
        dim=8,
        init=ps.init.Constant(0.0),
        optimizer=ps.optim.SGD(lr=1.0),
        codec=codec,
        push_codec="none",  # exact pushes: only the pulls round
    )
    plain = client.sparse_table(
        f"plain_{codec}", dim=8, init=ps.init.Constant(0.0), optimizer=ps.optim.SGD(lr=1.0)
    )
    rng = np.random.default_rng(1)
    keys = rng.choice(2**62, size=300, replace=False).astype(np.uint64)
    grads = rng.standard_normal((300, 8)).astype(np.float32)
    grads[:5] = 0.0  # rows that stay zero
    for _ in range(4):  # the key list gets cached on the servers along the way
        emb.push(keys, grads).result()
        plain.push(keys, grads).result()
        exact = plain.pull(keys)
        got = emb.pull(keys)
        want = decode_rows(encode_rows(exact, codec), codec, 8, np.float32)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got[:5], 0.0)
    again = np.concatenate([keys[:7], keys[:7]])  # repeated keys, in order
    np.testing.assert_array_equal(emb.pull(again), np.concatenate([want[:7], want[:7]]))
    emb2 = client.sparse_table(
        f"emb_{codec}",
        dim=8,
        init=ps.init.Constant(0.0),
        optimizer=ps.optim.SGD(lr=1.0),
        codec=codec,
        push_codec="none",
    )
    assert emb2.spec == emb.spec
    with pytest.raises(RemoteError, match="codec"):
        client.sparse_table(
            f"emb_{codec}", dim=8, init=ps.init.Constant(0.0), optimizer=ps.optim.SGD(lr=1.0)
        )
