"""Servers added and removed while training: real processes, ranges moved between them.

The reference is an undisturbed run with the same seed and data: in sync mode the final rows
(read by pulls) are bitwise the same; in async mode every push counts exactly once.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.wire.transport import Endpoint, new_context
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(240)

STEPS, WORKERS, DIM = 12, 2, 4
LOG = "warning"
KEYS = np.arange(1, 400, dtype=np.uint64)
GROUP = [("g1", 20), ("g2", 4)]  # a dense group: one table stays, one moves on a drain of 0
# past partition.DENSE_SPLIT_ELEMENTS: cut over every server, and cut anew by a move; its
# ranges on 3 servers are 1 MiB each (bulk.MIN_BYTES), so over TCP they take the bulk channel
BIG = 3 << 18
DENSE = [("bias", 8), *GROUP, ("big", BIG)]
INIT = {"sync": ps.init.Normal(std=0.1), "async": ps.init.Zeros()}


def view_of(address: str) -> dict[str, Any]:
    ctx = new_context()
    ep = Endpoint(ctx, request_timeout=5.0)
    try:
        ep.connect("coordinator", address)
        view: dict[str, Any] = ep.request("coordinator", {"kind": "get_view"}, what="view").result(
            5
        )["view"]
        return view
    finally:
        ep.close()
        ctx.term()


def joining(address: str) -> int | None:
    """The rank of the server joining in the move under way, if one is."""
    move = view_of(address).get("move")
    return int(move["rank"]) if move and move["kind"] == "join" else None


def moves_of(address: str) -> list[dict[str, Any]]:
    """The moves the coordinator finished (kind, rank, rows, bytes, dense tables moved)."""
    ctx = new_context()
    ep = Endpoint(ctx, request_timeout=5.0)
    try:
        ep.connect("coordinator", address)
        done: list[dict[str, Any]] = ep.request(
            "coordinator", {"kind": "status"}, what="status"
        ).result(5)["status"]["moves"]
        return done
    finally:
        ep.close()
        ctx.term()


def run_workers(
    cluster: ps.LocalCluster,
    work: Callable[[int], None],
    events: dict[int, Callable[[ps.LocalCluster], None]],
    talk: tuple[queue.Queue[int], queue.Queue[int]],
    errors: list[Exception],
) -> None:
    """Run ``work(w)`` for every worker on a thread; from this (the main) thread, run
    ``events[clock]`` when a worker puts ``clock`` in ``talk[0]``, then answer in ``talk[1]``
    (a child started by a thread that ends gets SIGTERM: PR_SET_PDEATHSIG is per thread)."""
    asked, answered = talk
    threads = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for _ in events:
        clock = asked.get(timeout=120 if not errors else 0.1)
        events[clock](cluster)
        answered.put(clock)
    for t in threads:
        t.join(180)


def train(
    consistency: str,
    optimizer: Any,
    grads: Callable[[int, int, np.ndarray], np.ndarray],
    events: dict[int, Callable[[ps.LocalCluster], None]],
    servers: int = 2,
    replication: int = 1,
    save: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Exception], dict[str, Any]]:
    """Train WORKERS threads for STEPS clocks on ``servers`` servers (``replication``
    copies; a checkpoint written to ``save`` at the end, if given); worker 0 runs
    ``events[clock]`` after that clock. Returns the final sparse rows of KEYS, the dense values (``bias``, then the group's
    ``g1`` and ``g2``, then ``big``), the errors raised. Placed by size: bias and g2 on
    server[0], g1 on server[1], big cut in two halves (a join cuts it in three, a drain back
    in two over the servers left)."""
    errors: list[Exception] = []
    asked: queue.Queue[int] = queue.Queue()
    answered: queue.Queue[int] = queue.Queue()
    with ps.LocalCluster(servers=servers, workers=WORKERS, timeouts=FAST, log_level=LOG,
                         replication=replication) as cluster:  # fmt: skip
        # worker 1 over TCP: its dense values take the bulk channel, worker 0's shared memory
        clients = [cluster.connect(transport="tcp" if w else None) for w in range(WORKERS)]

        def work(w: int) -> None:
            try:
                c = clients[w]
                emb = c.sparse_table("emb", dim=DIM, optimizer=optimizer, consistency=consistency,
                                     init=INIT[consistency], seed=3)  # fmt: skip
                dense = c.dense_table("bias", 8, optimizer=optimizer,
                                      consistency=consistency)  # fmt: skip
                big = c.dense_table("big", BIG, optimizer=optimizer, consistency=consistency,
                                    init=INIT[consistency])  # fmt: skip
                group = c.dense_group([c.dense_table(n, size, optimizer=optimizer,
                                                     consistency=consistency)
                                       for n, size in GROUP])  # fmt: skip
                rng = np.random.default_rng(100 + c.rank)
                pushed: list[Any] = []
                for step in range(STEPS):
                    keys = rng.choice(KEYS, size=64)
                    rows = emb.pull(keys)
                    pushed.append(emb.push(keys, grads(c.rank, step, rows)))
                    if consistency == "sync":
                        pushed.pop().result(60)
                    d = dense.pull()
                    dense.push(grads(c.rank, step, d)).result(60)
                    b = big.pull()
                    big.push(grads(c.rank, step, b)).result(60)
                    values = group.pull()
                    group.push([grads(c.rank, step, v) for v in values]).result(60)
                    clock = c.clock()
                    if c.rank == 0 and clock in events:
                        # run by the main thread: a child started by a thread that ends gets
                        # SIGTERM (PR_SET_PDEATHSIG is per thread)
                        asked.put(clock)
                        answered.get(timeout=60)
                for f in pushed:
                    f.result(60)
                c.barrier("end", timeout=60)
            except Exception as exc:
                errors.append(exc)

        run_workers(cluster, work, events, (asked, answered), errors)
        reader = clients[0]
        emb = reader.sparse_table("emb", dim=DIM, optimizer=optimizer, consistency=consistency,
                                  init=INIT[consistency], seed=3)  # fmt: skip
        dense = [reader.dense_table(n, size, optimizer=optimizer, consistency=consistency,
                                    **({"init": INIT[consistency]} if n == "big" else {}))
                 for n, size in DENSE]  # fmt: skip
        values = np.concatenate([d.pull() for d in dense])
        view = view_of(cluster.address)
        view["moves"] = moves_of(cluster.address)
        view["big"] = dense[-1].spec.ranges
        if save is not None:
            reader.save(save)
        return emb.pull(KEYS, create=False), values, errors, view


def sync_grads(rank: int, step: int, rows: np.ndarray) -> np.ndarray:
    return (rows * 0.5 + 0.01 * (rank + 1) * (step + 1)).astype(np.float32)


@pytest.mark.parametrize("opt", [ps.optim.Adagrad(lr=0.1), ps.optim.Adam(lr=0.01)],
                         ids=["adagrad", "adam"])  # fmt: skip
def test_a_server_added_and_another_drained_in_sync_training_changes_no_bit(opt: Any) -> None:
    # the drained server[0] holds the dense tables bias and g2 (of the group): they move whole
    # to the least loaded others; big is cut anew over 3 servers on the join and over the 2
    # left on the drain, its parts moving while both workers train (Adam: its step, a scalar
    # of every part, moves too, and a part applied twice or with a zero gradient would show)
    added: list[int] = []
    events = {
        4: lambda cl: added.append(cl.add_server()),
        8: lambda cl: cl.remove_server(0),
    }
    rows, dense, errors, view = train("sync", opt, sync_grads, events)
    assert errors == [] and added == [2]
    assert view["ring"] == [1, 2] and "move" not in view
    assert [st for r, _, st in view["servers"]] == ["left", "alive", "alive"]
    assert [(m["kind"], "big" in m["dense_tables"]) for m in view["moves"]] == [
        ("join", True),
        ("drain", True),
    ]
    assert view["big"] == ((1, 0, BIG // 2), (2, BIG // 2, BIG))
    ref_rows, ref_dense, ref_errors, _ = train("sync", opt, sync_grads, {})
    assert ref_errors == []
    assert rows.tobytes() == ref_rows.tobytes()
    assert dense.tobytes() == ref_dense.tobytes()


def test_a_server_holding_part_of_a_cut_dense_table_is_drained() -> None:
    # a table of 3 x 2^18 elements cut over both servers (a drain of such a server was refused
    # before dense ranges were re-cut): the drain moves server[0]'s half to server[1], which
    # then holds the whole table with every value as pushed
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST, log_level=LOG) as cluster:
        client = cluster.connect()
        big = client.dense_table("big", BIG, optimizer=ps.optim.SGD(lr=1.0),
                                 init=ps.init.Zeros())  # fmt: skip
        want = np.arange(BIG, dtype=np.float32)
        big.push(-want).result(30)
        assert big.spec.ranges == ((0, 0, BIG // 2), (1, BIG // 2, BIG))
        cluster.remove_server(0)
        for _ in range(200):  # the move completes once this worker ended a step
            client.clock()
            view = view_of(cluster.address)
            if view["ring"] == [1]:
                break
        assert view["ring"] == [1] and "move" not in view
        assert big.spec.ranges == ((1, 0, BIG),)
        np.testing.assert_array_equal(big.pull(), want)
        big.push(np.ones(BIG, np.float32)).result(30)
        np.testing.assert_array_equal(big.pull(), want - 1)


def ones_grads(rank: int, step: int, rows: np.ndarray) -> np.ndarray:
    return np.ones_like(rows)


def test_pushes_during_moves_in_async_training_count_once() -> None:
    # SGD lr=1 on all-ones gradients from zero rows: each row ends at minus the times its key
    # was pushed, as NumPy counts them from the same random draws
    opt = ps.optim.SGD(lr=1.0)
    events = {3: lambda cl: cl.add_server(), 7: lambda cl: cl.remove_server(0)}
    rows, dense, errors, view = train("async", opt, ones_grads, events)
    assert errors == []
    assert view["ring"] == [1, 2] and "move" not in view
    check_counts(rows, dense)


def check_counts(rows: np.ndarray, dense: np.ndarray) -> None:
    """``rows`` of KEYS and ``dense`` values of an async SGD lr=1 run of all-ones gradients
    from zeros are minus the times each was pushed (the sparse keys as NumPy draws them)."""
    counts = np.zeros(int(KEYS.max()) + 1)
    for w in range(WORKERS):
        rng = np.random.default_rng(100 + w)
        for _ in range(STEPS):
            counts += np.bincount(rng.choice(KEYS, size=64), minlength=len(counts))
    want = -np.repeat(counts[KEYS.astype(np.int64)][:, None], DIM, axis=1)
    np.testing.assert_array_equal(rows, want.astype(np.float32))
    size = sum(n for _, n in DENSE)
    np.testing.assert_array_equal(dense, np.full(size, -STEPS * WORKERS, np.float32))


def test_a_server_started_against_a_running_job_joins_and_paramserver_drain_removes_it() -> None:
    # one worker, sync SGD lr=1 on all-ones gradients of the same keys every step: each row
    # ends at minus the number of steps, wherever the rows moved meanwhile; so does every
    # element of a dense table cut over the servers (the joining one gets a third of it, which
    # goes back to the others when it is drained)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=2, optimizer=ps.optim.SGD(lr=1.0),
                                  init=ps.init.Zeros(), consistency="sync")  # fmt: skip
        big = client.dense_table("big", BIG, optimizer=ps.optim.SGD(lr=1.0),
                                 init=ps.init.Zeros(), consistency="sync")  # fmt: skip
        cli = [sys.executable, "-m", "paramserver.cli"]
        joiner = subprocess.Popen(
            [*cli, "server", "--coordinator", cluster.address, "--host", "127.0.0.1"], env=env
        )
        drain: subprocess.Popen[bytes] | None = None
        try:
            # the move waits for this worker's clocks: first the new process must register
            # (its start is not bounded by the steps below)
            wait_until(lambda: joining(cluster.address) == 2, 120,
                       "the server started by the command line to register")  # fmt: skip
            steps = 0
            for _ in range(400):
                emb.push(KEYS, np.ones((len(KEYS), 2), np.float32)).result(30)
                big.push(np.ones(BIG, np.float32)).result(30)
                client.clock()
                steps += 1
                view = view_of(cluster.address)
                if drain is None and view["ring"] == [0, 1, 2]:
                    assert big.spec.ranges[2][0] == 2  # the newcomer holds the last third
                    drain = subprocess.Popen(
                        [*cli, "drain", "2", "--coordinator", cluster.address, "--timeout", "60"],
                        env=env,
                        stdout=subprocess.PIPE,
                    )
                if drain is not None and drain.poll() is not None:
                    break
            assert drain is not None and drain.wait(30) == 0
            assert (
                drain.stdout is not None
                and b"server[2] drained: ring [0, 1]" in drain.stdout.read()
            )
            assert joiner.wait(30) == 0  # told to stop once its keys left
            rows = emb.pull(KEYS)
            np.testing.assert_array_equal(rows, np.full((len(KEYS), 2), -steps, np.float32))
            assert [s for s, _, _ in big.spec.ranges] == [0, 1]
            np.testing.assert_array_equal(big.pull(), np.full(BIG, -steps, np.float32))
        finally:
            for p in (joiner, drain):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()


def test_a_checkpoint_after_a_join_holds_each_key_once_and_restores_on_fewer_servers(
    tmp_path: Path,
) -> None:
    # the source keeps no stale copy of the rows that left, nor of its old dense range:
    # restored on a cluster of another size (another ring), every row and dense element is
    # the one pulled before the save
    opt = ps.optim.Adagrad(lr=0.1)
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=DIM, optimizer=opt, init=ps.init.Zeros())
        big = client.dense_table("big", BIG, optimizer=opt, init=ps.init.Normal(std=0.1))
        emb.push(KEYS, np.ones((len(KEYS), DIM), np.float32)).result(30)
        client.clock()
        cluster.add_server()
        for _ in range(200):  # the move completes once this worker ended a step
            emb.push(KEYS, np.full((len(KEYS), DIM), 0.5, np.float32)).result(30)
            big.push(np.full(BIG, 0.5, np.float32)).result(30)
            client.clock()
            if view_of(cluster.address)["ring"] == [0, 1, 2]:
                break
        emb.push(KEYS, np.full((len(KEYS), DIM), 0.25, np.float32)).result(30)
        big.push(np.linspace(-1, 1, BIG, dtype=np.float32)).result(30)
        client.clock()
        want = emb.pull(KEYS, create=False)
        want_big = big.pull()
        assert len(big.spec.ranges) == 3
        stats = {s["rank"]: s["tables"]["emb"]["rows"] for s in client.stats()}
        path = client.save(tmp_path / "ckpt")
    assert sum(stats.values()) == len(KEYS) and stats[2] > 0  # each key on one server only
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST, restore=path) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=DIM, optimizer=opt, init=ps.init.Zeros())
        assert emb.pull(KEYS, create=False).tobytes() == want.tobytes()
        big = client.dense_table("big", BIG, optimizer=opt, init=ps.init.Normal(std=0.1))
        assert big.pull().tobytes() == want_big.tobytes()
