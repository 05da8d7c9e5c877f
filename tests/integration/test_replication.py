"""Replication (``replication=k``): every range on k servers, a push acknowledged once every
live copy holds it, reads moved to the next copy when a server dies. Real processes, SIGKILL.

* sync training with a server SIGKILLed at a random clock ends bitwise equal to an
  uninterrupted run (without replication) on the same data;
* in async mode no acknowledged push is lost (SGD with lr 1 of all-ones gradients: each key's
  value is minus the number of acknowledged pushes that held it);
* a replication the cluster cannot hold is refused.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.cli import main
from paramserver.errors import ConfigError
from tests.integration.test_recovery import view_of
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(240)

SERVERS, WORKERS, STEPS, KEYS = 3, 2, 14, 600


def _batches(seed: int) -> list[list[np.ndarray]]:
    """Each step's key list of each worker (repeats included: the worker sums them)."""
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, KEYS, 300).astype(np.uint64) for _ in range(WORKERS)] for _ in range(STEPS)
    ]


def _server_pid(cluster: ps.LocalCluster, rank: int) -> int:
    return cluster.pids[f"server {rank}"]


def _entry(cluster: ps.LocalCluster, rank: int) -> tuple[str, str]:
    """Server ``rank``'s address and state in the coordinator's view."""
    view: Any = view_of(cluster.address)
    return next((str(a), str(st)) for r, a, st in view["servers"] if r == rank)


def _wait_replaced(cluster: ps.LocalCluster, rank: int, before: tuple[str, str]) -> None:
    """Wait until the view no longer lists ``before`` (the killed process, alive) for ``rank``:
    it is declared dead, or its replacement registered (rebuilding, or already rebuilt)."""
    wait_until(lambda: _entry(cluster, rank) != before, 30, f"server[{rank}] declared dead")


def _train_sync(
    replication: int,
    kill: tuple[int, int] | None,
    seed: int,
    transport: str,
    save: Path | None = None,
) -> dict[str, np.ndarray]:
    """Two workers in lockstep (one process, one client each), sync tables whose gradients
    depend on the values pulled: any lost or doubled update changes the end result."""
    batches = _batches(seed)
    with ps.LocalCluster(
        servers=SERVERS, workers=WORKERS, timeouts=FAST, replication=replication
    ) as cluster:
        clients = [cluster.connect(rank=r, transport=transport) for r in range(WORKERS)]
        tables = [
            (
                c.sparse_table(
                    "emb", dim=8, optimizer=ps.optim.SGD(lr=0.1), consistency="sync",
                    init=ps.init.Normal(0.0, 0.1),
                ),
                c.dense_table("w", shape=(3000,), optimizer=ps.optim.SGD(lr=0.1),
                              consistency="sync"),
                c.dense_table("b", shape=(7,), optimizer=ps.optim.SGD(lr=0.1), consistency="sync"),
                # small tables in one request per server (pull_many, push_many)
                c.dense_group([
                    c.dense_table(n, shape=(m,), optimizer=ps.optim.SGD(lr=0.1),
                                  consistency="sync")
                    for n, m in (("g1", 5), ("g2", 3))
                ]),
            )
            for c in clients
        ]  # fmt: skip
        for step in range(STEPS):
            if kill is not None and step == kill[0]:
                os.kill(_server_pid(cluster, kill[1]), signal.SIGKILL)
            for r, (emb, w, b, group) in enumerate(tables):
                keys = batches[step][r]
                rows = emb.pull(keys)
                wv, bv = w.pull(), b.pull()
                grads = (rows * np.float32(0.5) + np.float32(r + 1)).astype(np.float32)
                f1 = emb.push(keys, grads)
                f2 = w.push((wv * np.float32(0.3) + np.float32(step)).astype(np.float32))
                f3 = b.push((bv - np.float32(1.0)).astype(np.float32))
                g1, g2 = group.pull()
                f4 = group.push([g1 * np.float32(0.5) + np.float32(r), g2 - np.float32(2.0)])
                for f in (f1, f2, f3, f4):
                    f.result()
            for c in clients:
                c.clock()
        emb, w, b, group = tables[0]
        out = {"emb": emb.pull(np.arange(KEYS, dtype=np.uint64)), "w": w.pull(), "b": b.pull()}
        out["g1"], out["g2"] = group.pull()
        if save is not None:
            clients[0].save(save)
        if kill is not None:
            stats = clients[0].stats()
            assert all(
                stats[r]["tables"]["emb"]["rows"] > 0 for r in range(SERVERS) if r != kill[1]
            )
            # the replacement is rebuilt from the live copies (tests/integration/test_rebuild.py)
            # or still on its way: a rebuilding one is asked nothing (it holds nothing yet)
            servers = {r: st for r, _, st in view_of(cluster.address)["servers"]}  # type: ignore[attr-defined]
            assert servers[kill[1]] in ("rebuilding", "dead", "alive"), servers
            if servers[kill[1]] != "alive":
                assert stats[kill[1]]["tables"] == {}
        return out


@pytest.mark.parametrize("transport", ["tcp", "auto"])  # auto: shared memory and slots
def test_sync_training_through_a_server_kill_is_bitwise_equal(transport: str) -> None:
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    kill = (rnd.randrange(2, STEPS - 2), rnd.randrange(SERVERS))
    print(f"seed {seed}: server[{kill[1]}] SIGKILLed at clock {kill[0]}")
    reference = _train_sync(1, None, seed, transport)
    killed = _train_sync(2, kill, seed, transport)
    for name in reference:
        assert reference[name].dtype == killed[name].dtype
        np.testing.assert_array_equal(killed[name], reference[name], err_msg=name)
        assert reference[name].tobytes() == killed[name].tobytes(), name  # bitwise


def test_async_acknowledged_pushes_survive_a_server_kill() -> None:
    rng = np.random.default_rng(7)
    steps, kill_at = 40, 15
    with ps.LocalCluster(servers=SERVERS, workers=1, timeouts=FAST, replication=2) as cluster:
        client = cluster.connect()
        emb = client.sparse_table(
            "emb", dim=4, optimizer=ps.optim.SGD(lr=1.0), consistency="async",
            init=ps.init.Zeros(),
        )  # fmt: skip
        dense = client.dense_table(
            "d", shape=(500,), optimizer=ps.optim.SGD(lr=1.0), consistency="async"
        )
        counts = np.zeros(KEYS, np.int64)
        dense_acks = 0
        victim = int(rng.integers(SERVERS))
        pending: list[Any] = []
        for step in range(steps):
            if step == kill_at:
                before = _entry(cluster, victim)
                os.kill(_server_pid(cluster, victim), signal.SIGKILL)
            keys = rng.choice(KEYS, size=200, replace=False).astype(np.uint64)
            ones = np.ones((len(keys), 4), np.float32)
            # two pushes in flight at once, acknowledged later: the kill finds some unanswered
            pending.append((keys, emb.push(keys, ones), dense.push(np.ones(500, np.float32))))
            if len(pending) > 2:
                k, f1, f2 = pending.pop(0)
                f1.result()  # raises if not every live copy acknowledged it
                counts[k.astype(np.int64)] += 1
                f2.result()
                dense_acks += 1
            client.clock()
        for k, f1, f2 in pending:
            f1.result()
            counts[k.astype(np.int64)] += 1
            f2.result()
            dense_acks += 1
        _wait_replaced(cluster, victim, before)
        rows = emb.pull(np.arange(KEYS, dtype=np.uint64))
        # every acknowledged push is there, once: value = -(acknowledged pushes of that key)
        np.testing.assert_array_equal(
            rows, -np.repeat(counts[:, None], 4, axis=1).astype(np.float32)
        )
        np.testing.assert_array_equal(dense.pull(), np.full(500, -dense_acks, np.float32))
        assert dense_acks == steps


def test_a_replication_larger_than_the_servers_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="replication=3 needs at least 3 servers"):
        ps.LocalCluster(servers=2, workers=1, replication=3)
    with pytest.raises(ConfigError, match="replication must be an integer >= 1"):
        ps.LocalCluster(servers=2, workers=1, replication=0)
    code = main(
        ["coordinator", "--bind", "127.0.0.1:0", "-s", "2", "-w", "1", "--replication", "3"]
    )
    assert code == 2
    assert "replication=3 needs at least 3 servers" in capsys.readouterr().err
    program = tmp_path / "train.py"
    program.write_text("raise SystemExit('never started')\n")
    assert main(["run", "-s", "2", "--replication", "3", str(program)]) == 2
    assert "replication=3 needs at least 3 servers" in capsys.readouterr().err


def test_a_checkpoint_of_a_replicated_cluster_restores_each_key_once(tmp_path: Path) -> None:
    """Every key is in the checkpoint twice (two copies wrote it): a cluster restored from it,
    with or without replication, has the values of the run that wrote it."""
    seed = 11
    trained = _train_sync(2, None, seed, "tcp", save=tmp_path / "ckpt")
    for replication in (1, 2):
        with ps.LocalCluster(
            servers=SERVERS,
            workers=1,
            timeouts=FAST,
            restore=tmp_path / "ckpt",
            replication=replication,
        ) as cluster:
            client = cluster.connect(transport="tcp")
            emb = client.sparse_table(
                "emb", dim=8, optimizer=ps.optim.SGD(lr=0.1), consistency="sync",
                init=ps.init.Normal(0.0, 0.1),
            )  # fmt: skip
            w = client.dense_table("w", shape=(3000,), optimizer=ps.optim.SGD(lr=0.1),
                                   consistency="sync")  # fmt: skip
            rows = emb.pull(np.arange(KEYS, dtype=np.uint64))
            np.testing.assert_array_equal(
                rows, trained["emb"], err_msg=f"replication {replication}"
            )
            np.testing.assert_array_equal(w.pull(), trained["w"])


def test_a_pull_waiting_on_a_killed_primary_is_answered_by_the_copy() -> None:
    """Sync: worker 0's pull waits at the primary for worker 1's clock; the primary is killed;
    the pull moves to the copy and gets the mean that includes worker 1's push of that clock."""
    from paramserver.partition import HashRing

    candidates = np.arange(2000, dtype=np.uint64)
    keys = candidates[HashRing.build(list(range(SERVERS))).route(candidates) == 1][:50]
    with ps.LocalCluster(servers=SERVERS, workers=2, timeouts=FAST, replication=2) as cluster:
        a, b = (cluster.connect(rank=r, transport="tcp") for r in range(2))
        ta, tb = (
            c.sparse_table("emb", dim=4, optimizer=ps.optim.SGD(lr=1.0), consistency="sync",
                           init=ps.init.Zeros())
            for c in (a, b)
        )  # fmt: skip
        ones = np.ones((len(keys), 4), np.float32)
        ta.push(keys, ones).result()
        tb.push(keys, 2 * ones).result()
        a.clock()
        b.clock()
        np.testing.assert_array_equal(ta.pull(keys), -1.5 * ones)  # mean of 1 and 2
        a.clock()
        waiting = ta.pull_async(keys)  # clock 2: waits at server[1] for worker 1
        a.endpoint.poll(0.2)
        assert not waiting.done()
        os.kill(_server_pid(cluster, 1), signal.SIGKILL)
        tb.push(keys, 4 * ones).result()  # acknowledged by the copy alone once 1 is dead
        b.clock()
        # clock 1 holds worker 1's push only: the mean over 2 live workers is 2
        np.testing.assert_array_equal(waiting.result(30), -3.5 * ones)
        np.testing.assert_array_equal(tb.pull(keys), -3.5 * ones)


def test_assign_and_restore_reach_every_copy(tmp_path: Path) -> None:
    """Rows written into a running table (``assign``) and a restore from a checkpoint land on
    every copy: after the primary of the keys is SIGKILLed, the copy serves exactly them."""
    keys = np.arange(200, dtype=np.uint64)
    with ps.LocalCluster(servers=3, workers=1, timeouts=FAST, replication=2) as cluster:
        c = cluster.connect(rank=0)
        emb = c.sparse_table("emb", dim=4, optimizer=ps.optim.SGD(lr=1.0))
        w = c.dense_table("w", shape=(50,), optimizer=ps.optim.SGD(lr=1.0))
        emb.push(keys, np.ones((len(keys), 4), np.float32)).result()
        w.push(np.ones(50, np.float32)).result()
        saved_rows, saved_w = emb.pull(keys), w.pull()
        path = c.save(tmp_path / "ckpt")
        emb.push(keys, np.ones((len(keys), 4), np.float32)).result()
        w.push(np.ones(50, np.float32)).result()
        assert c.restore(path) == 2
        np.testing.assert_array_equal(emb.pull(keys), saved_rows)
        np.testing.assert_array_equal(w.pull(), saved_w)
        rows = np.arange(len(keys) * 4, dtype=np.float32).reshape(len(keys), 4)
        emb.assign(keys, rows)
        w.assign(np.full(50, 7.0, np.float32))
        # every server is some key's primary: kill one, its keys are read from their copy
        victim = 1
        before = _entry(cluster, victim)
        os.kill(_server_pid(cluster, victim), signal.SIGKILL)
        _wait_replaced(cluster, victim, before)
        np.testing.assert_array_equal(emb.pull(keys), rows)
        np.testing.assert_array_equal(w.pull(), np.full(50, 7.0, np.float32))
        c.close()
