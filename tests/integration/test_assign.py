"""Writing into the tables of a running cluster: SparseTable.assign, DenseTable.assign and
Client.restore through real servers, checked against NumPy optimizer math and against the
values the cluster itself had when it wrote a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from paramserver.client import sparse
from paramserver.errors import ConfigError, RemoteError

pytestmark = pytest.mark.timeout(120)

U64 = np.uint64
EPS = ps.optim.Adagrad().eps


def test_sparse_assign_sets_rows_after_earlier_pushes_and_resets_their_state(
    cluster: ps.LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests of 16 rows: a repeated key's rows travel in different requests, in order
    monkeypatch.setattr(sparse, "ASSIGN_ROWS", 16)
    client = cluster.connect()
    emb = client.sparse_table("emb", dim=3, optimizer=ps.optim.Adagrad(lr=0.1))
    rng = np.random.default_rng(0)
    keys = rng.permutation(np.arange(200, dtype=U64) * U64(2**55 + 13))
    for _ in range(2):
        emb.push(keys, rng.standard_normal((200, 3)).astype(np.float32)).result()
    # a push not waited for, then the assign: applied after it (one connection per server)
    emb.push(keys, np.ones((200, 3), np.float32))
    targets = np.concatenate([keys[:50], keys[:10], np.arange(30, dtype=U64) * U64(3) + U64(1)])
    rows = rng.standard_normal((len(targets), 3)).astype(np.float32)
    emb.assign(targets, rows)
    ref = {int(k): r for k, r in zip(targets.tolist(), rows, strict=True)}  # the last one wins
    want = np.array([ref[k] for k in targets.tolist()])
    np.testing.assert_array_equal(emb.pull(targets, create=False), want)
    stats = client.stats(timeout=10)
    assert sum(s["tables"]["emb"]["rows"] for s in stats) == 230
    assert all(s["tables"]["emb"]["rows"] for s in stats), "the keys reached one server only"
    # Adagrad starts afresh on the assigned rows (accumulator 0 + g^2): NumPy's first step
    distinct = np.array(sorted(ref), U64)
    g = rng.standard_normal((len(distinct), 3)).astype(np.float32)
    emb.push(distinct, g).result()
    start = np.array([ref[k] for k in distinct.tolist()], np.float64)
    first = start - 0.1 * g / (np.sqrt(g.astype(np.float64) ** 2) + EPS)
    np.testing.assert_allclose(emb.pull(distinct, create=False), first, rtol=1e-6, atol=1e-7)


def test_dense_assign_resets_adam_and_follows_the_workers_pushes(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    shape = (300, 1000)  # large enough to be cut into a range per server
    w = client.dense_table("w", shape=shape, optimizer=ps.optim.Adam(lr=0.1))
    assert len(w.spec.ranges) == 2
    for _ in range(3):
        w.push(np.ones(shape, np.float32)).result()
    w.push(np.ones(shape, np.float32))  # not waited for: applied before the assign
    values = np.arange(w.spec.size, dtype=np.float32).reshape(shape) / 7
    w.assign(values)
    np.testing.assert_array_equal(w.pull(), values)
    g = np.linspace(-2, 2, w.spec.size, dtype=np.float32).reshape(shape)
    w.push(g).result()
    want = values - 0.1 * g / (np.abs(g) + ps.optim.Adam().eps)  # Adam's first step
    np.testing.assert_allclose(w.pull(), want, rtol=1e-5, atol=1e-6)


def test_sync_assign_applies_at_once_and_the_clocks_pushes_on_top(
    cluster: ps.LocalCluster,
) -> None:
    client = cluster.connect()
    emb = client.sparse_table("synced", dim=2, optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
    keys = np.array([3, 8], U64)
    emb.push(keys, np.ones((2, 2), np.float32)).result()  # buffered until the clock ends
    values = np.array([[5.0, 6.0], [7.0, 8.0]], np.float32)
    emb.assign(keys, values)
    with pytest.warns(UserWarning, match="does not see"):  # this clock's push: not yet
        np.testing.assert_array_equal(emb.pull(keys), values)
    client.clock()
    np.testing.assert_array_equal(emb.pull(keys), values - 1.0)


def test_bad_assigns_are_refused_and_change_nothing(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    emb = client.sparse_table("guarded", dim=2, optimizer=ps.optim.Adagrad(lr=0.1))
    dense = client.dense_table("guarded_dense", shape=(6,))
    keys = np.array([1, 2, 3], U64)
    emb.push(keys, np.ones((3, 2), np.float32)).result()
    before, before_dense = emb.pull(keys), dense.pull()
    nan = np.ones((3, 2), np.float32)
    nan[1, 0] = np.nan
    for rows, what in (
        (np.zeros((3, 2), np.float64), "float32 rows"),
        (np.zeros((3, 3), np.float32), r"shape \(3, 2\)"),
        (np.zeros((2, 2), np.float32), r"shape \(3, 2\)"),
        (nan, "NaN or Inf"),
    ):
        with pytest.raises(ConfigError, match=what):
            emb.assign(keys, rows)
    with pytest.raises(ConfigError, match=r"shape \(6,\)"):
        dense.assign(np.zeros(5, np.float32))
    with pytest.raises(ConfigError, match="NaN or Inf"):
        dense.assign(np.full(6, np.inf, np.float32))
    with pytest.raises(ConfigError, match="no table 'guardd'"):
        client.table("guardd")
    # what a worker's checks would stop, the servers refuse too
    head = {"kind": "assign", "rank": client.rank}
    for table, arrays, code in (
        ("guarded", [keys, nan], "non_finite"),
        ("guarded", [keys, np.zeros((3, 5), np.float32)], "invalid"),
        ("guarded", [keys], "invalid"),
        ("nope", [keys, np.zeros((3, 2), np.float32)], "unknown_table"),
    ):
        fut = client.request_server(
            0, {**head, "table": table, "seq": client.next_seq()}, arrays, what="a bad assign"
        )
        with pytest.raises(RemoteError) as err:
            fut.result(10)
        assert err.value.code == code
    np.testing.assert_array_equal(emb.pull(keys), before)
    np.testing.assert_array_equal(dense.pull(), before_dense)
    assert sum(s["tables"]["guarded"]["rows"] for s in client.stats(timeout=10)) == 3


def test_restore_puts_every_table_back_optimizer_state_included(
    cluster: ps.LocalCluster, tmp_path: Path
) -> None:
    """The step after a restore is, bit for bit, the step the cluster took right after the
    save; rows created after the save are gone; a checkpoint that does not fit, or is not
    there, changes nothing."""
    client = cluster.connect()
    emb = client.sparse_table("emb", dim=4, optimizer=ps.optim.Adagrad(lr=0.1))
    w = client.dense_table("w", shape=(30,), optimizer=ps.optim.Adam(lr=0.05))
    rng = np.random.default_rng(3)
    keys = np.arange(100, dtype=U64) * U64(7919)
    g_emb = [rng.standard_normal((100, 4)).astype(np.float32) for _ in range(4)]
    g_w = [rng.standard_normal(30).astype(np.float32) for _ in range(4)]

    def step(i: int) -> None:
        emb.push(keys, g_emb[i]).result()
        w.push(g_w[i]).result()

    step(0)
    step(1)
    saved = client.save(tmp_path / "ckpt")
    at_save = emb.pull(keys, create=False), w.pull()
    step(2)
    after_step = emb.pull(keys, create=False), w.pull()
    step(3)
    emb.pull(np.arange(1000, 1050, dtype=U64))  # rows the checkpoint does not have

    # a checkpoint whose table differs (here: in its optimizer) is refused
    # before any server changes anything
    odd = tmp_path / "odd"
    shutil.copytree(saved, odd)
    manifest = json.loads((odd / "manifest.json").read_text())
    for t in manifest["tables"]:
        if t["name"] == "w":
            t["optimizer"] = {"kind": "sgd", "lr": 0.05}
    (odd / "manifest.json").write_text(json.dumps(manifest))
    now = emb.pull(keys, create=False), w.pull()
    with pytest.raises(RemoteError, match="optimizer 'adam' here and 'sgd' in the checkpoint"):
        client.restore(odd, timeout=20)
    with pytest.raises(RemoteError, match="does not exist"):
        client.restore(tmp_path / "nothing", timeout=20)
    np.testing.assert_array_equal(emb.pull(keys, create=False), now[0])
    np.testing.assert_array_equal(w.pull(), now[1])

    assert client.restore(saved, timeout=20) >= 2
    np.testing.assert_array_equal(emb.pull(keys, create=False), at_save[0])
    np.testing.assert_array_equal(w.pull(), at_save[1])
    assert sum(s["tables"]["emb"]["rows"] for s in client.stats(timeout=10)) == 100
    step(2)  # Adagrad's and Adam's state as saved: the same step as before
    np.testing.assert_array_equal(emb.pull(keys, create=False), after_step[0])
    np.testing.assert_array_equal(w.pull(), after_step[1])
