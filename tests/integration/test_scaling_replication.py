"""Servers added and removed while training with ``replication=2``: real processes, each key's
copies placed along the ring's members (``partition.replicas_of``) and moved with the ring.

The reference is an undisturbed run with the same seed and data: in sync mode the final rows
are bitwise the same, and the two copies of every key (read from a checkpoint, where every
server writes what it holds) are bitwise equal and on the servers the final ring names.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import RemoteError
from paramserver.partition import HashRing, replicas_of
from tests.integration.test_scaling import (
    check_counts,
    ones_grads,
    run_workers,
    sync_grads,
    view_of,
)
from tests.integration.test_scaling import train as scaling_train
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(240)

STEPS, WORKERS, DIM = 12, 2, 4
LOG = "warning"
KEYS = np.arange(1, 400, dtype=np.uint64)


def grads(rank: int, step: int, rows: np.ndarray) -> np.ndarray:
    return (rows * 0.5 + 0.01 * (rank + 1) * (step + 1)).astype(np.float32)


def train(
    optimizer: Any,
    events: dict[int, Callable[[ps.LocalCluster], None]],
    save: Path,
    consistency: str = "sync",
    grads: Callable[[int, int, np.ndarray], np.ndarray] = grads,
) -> tuple[np.ndarray, list[Exception], dict[str, Any]]:
    """Train WORKERS threads for STEPS clocks on 2 servers with replication=2; worker 0
    runs ``events[clock]`` (from the main thread) after that clock. Returns the final rows of
    KEYS, the errors raised, the last view; a checkpoint is written to ``save``."""
    errors: list[Exception] = []
    asked: queue.Queue[int] = queue.Queue()
    answered: queue.Queue[int] = queue.Queue()
    with ps.LocalCluster(
        servers=2, workers=WORKERS, timeouts=FAST, log_level=LOG, replication=2
    ) as cluster:
        # worker 1 over TCP, worker 0 over shared memory
        clients = [cluster.connect(transport="tcp" if w else None) for w in range(WORKERS)]

        def table(c: Any) -> Any:
            init = ps.init.Normal(std=0.1) if consistency == "sync" else ps.init.Zeros()
            return c.sparse_table("emb", dim=DIM, optimizer=optimizer, consistency=consistency,
                                  init=init, seed=3)  # fmt: skip

        def work(w: int) -> None:
            try:
                c = clients[w]
                emb = table(c)
                rng = np.random.default_rng(100 + c.rank)
                pushed: list[Any] = []
                for step in range(STEPS):
                    keys = rng.choice(KEYS, size=64)
                    rows = emb.pull(keys)
                    pushed.append(emb.push(keys, grads(c.rank, step, rows)))
                    if consistency == "sync":
                        pushed.pop().result(60)
                    clock = c.clock()
                    if c.rank == 0 and clock in events:
                        asked.put(clock)
                        answered.get(timeout=60)
                for f in pushed:
                    f.result(60)
                c.barrier("end", timeout=60)
            except Exception as exc:
                errors.append(exc)

        run_workers(cluster, work, events, (asked, answered), errors)
        emb = table(clients[0])
        rows = emb.pull(KEYS, create=False)
        clients[0].save(save)
        return rows, errors, view_of(cluster.address)


def copies_in(path: Path) -> dict[int, dict[int, bytes]]:
    """Per key, per server, the row it wrote for table ``emb`` in the checkpoint at ``path``."""
    directory = Path(path)
    if (directory / "LATEST").exists():
        directory = directory / (directory / "LATEST").read_text().strip()
    out: dict[int, dict[int, bytes]] = {}
    for index in sorted(directory.glob("server-*/index.json")):
        idx = json.loads(index.read_text())
        entry = idx["tables"]["emb"]
        if not entry["count"]:
            continue
        keys = np.load(index.parent / entry["keys"])
        rows = np.load(index.parent / entry["rows"])
        for key, row in zip(keys.tolist(), rows, strict=True):
            out.setdefault(int(key), {})[int(idx["rank"])] = row.tobytes()
    return out


@pytest.mark.parametrize("opt", [ps.optim.Adagrad(lr=0.1), ps.optim.Adam(lr=0.01)],
                         ids=["adagrad", "adam"])  # fmt: skip
def test_a_join_and_a_drain_with_replication_change_no_bit_and_keep_two_equal_copies(
    opt: Any, tmp_path: Path
) -> None:
    added: list[int] = []
    events = {
        4: lambda cl: added.append(cl.add_server()),
        8: lambda cl: cl.remove_server(0),
    }
    rows, errors, view = train(opt, events, tmp_path / "moved")
    assert errors == [] and added == [2]
    assert view["ring"] == [1, 2] and "move" not in view
    assert [st for _, _, st in view["servers"]] == ["left", "alive", "alive"]
    ref_rows, ref_errors, ref_view = train(opt, {}, tmp_path / "ref")
    assert ref_errors == [] and ref_view["ring"] == [0, 1]
    assert rows.tobytes() == ref_rows.tobytes()
    held: dict[str, dict[int, dict[int, bytes]]] = {}
    for path, ring in ((tmp_path / "moved", [1, 2]), (tmp_path / "ref", [0, 1])):
        held[str(ring)] = check_copies(path, ring)
    # the keys some push or pull created (nearly all of KEYS), the same in both runs
    assert set(held["[1, 2]"]) == set(held["[0, 1]"]) and len(held["[1, 2]"]) > len(KEYS) * 0.9
    for key, by_server in held["[1, 2]"].items():  # and equal to the undisturbed run's
        assert set(by_server.values()) == set(held["[0, 1]"][key].values()), key


def check_copies(path: Path, ring: list[int]) -> dict[int, dict[int, bytes]]:
    """Every key of the checkpoint at ``path`` on the two servers ``ring`` gives it, bitwise
    equal; returns the copies."""
    copies = copies_in(path)
    owners = HashRing.build(ring).route(np.asarray(sorted(copies), np.uint64))
    for (key, by_server), owner in zip(sorted(copies.items()), owners, strict=True):
        assert sorted(by_server) == sorted(replicas_of(int(owner), ring, 2)), key
        assert len(set(by_server.values())) == 1, key  # the copies are bitwise equal
    return copies


@pytest.mark.parametrize(
    ("late", "replication", "servers"),
    [(False, 2, 2), (True, 2, 2), (True, 1, 2), (True, 2, 3)],
    ids=["together", "one-switches-late", "one-switches-late-without-copies",
         "one-switches-late-3-servers"],
)  # fmt: skip
def test_pushes_during_moves_with_replication_in_async_training_count_once(
    late: bool, replication: int, servers: int, tmp_path: Path
) -> None:
    # SGD lr=1 on all-ones gradients from zero rows: each row ends at minus the times its key
    # was pushed, as NumPy counts them from the same random draws; pushes are not waited for
    # before the next step. ``late``: while a server joins and another is drained, worker 1
    # stops between two steps (it switches rings late) and worker 0 pushes on by the new ring
    # (no pulls): a key's old primary that holds it on the new ring too applies worker 0's
    # pushes before its final, and the new copy, which holds them till the move's end, must
    # not apply them again (server/copies.py; without it keys count some pushes twice), nor take a held push for a
    # retry (server/loop.py: requests behind a held one stay behind it after the move's end).
    # With 3 servers two dense tables take the same pushes: ``d2`` lives on 2 and 0, and the
    # join of 3 gives its copy to 3 while 2 keeps it (2 applies worker 0's pushes before its
    # final, 3 must not again: server/copies.py ``dense_applied``); ``d0`` (on 0 and 1) goes
    # to 1 and 2 on the drain of 0
    errors: list[Exception] = []
    steps = [0] * WORKERS
    goal = [STEPS]  # every worker ends at this step (a save waits for all clocks)
    done = threading.Event()
    gate, at_gate = threading.Event(), threading.Event()  # worker 1's stop between steps
    gate.set()
    new_ring_pushes = [0]  # worker 0's pushes routed by a move's new ring
    with ps.LocalCluster(
        servers=servers, workers=WORKERS, timeouts=FAST, log_level=LOG, replication=replication
    ) as cluster:
        clients = [cluster.connect(transport="tcp" if w else None) for w in range(WORKERS)]

        def dense(c: Any) -> list[Any]:
            return [c.dense_table(n, 8, optimizer=ps.optim.SGD(lr=1.0), consistency="async",
                                  init=ps.init.Zeros()) for n in ("d0", "d2")]  # fmt: skip

        def work(w: int) -> None:
            try:
                c = clients[w]
                emb = c.sparse_table("emb", dim=DIM, optimizer=ps.optim.SGD(lr=1.0),
                                     consistency="async", init=ps.init.Zeros())  # fmt: skip
                ds = dense(c) if servers == 3 else []
                rng = np.random.default_rng(100 + w)  # (counted by w below)
                pushed: list[Any] = []
                while not done.is_set() or steps[w] < goal[0]:
                    if late and w == 1 and not gate.is_set():
                        at_gate.set()
                        gate.wait(120)
                        at_gate.clear()
                    keys = rng.choice(KEYS, size=64)
                    if w == 1 or not late:
                        emb.pull(keys)
                    pushed.append(emb.push(keys, np.ones((64, DIM), np.float32)))
                    pushed += [d.push(np.ones(8, np.float32)) for d in ds]
                    if late and w == 0 and c.ring_servers != view_of(cluster.address)["ring"]:
                        new_ring_pushes[0] += 1  # (the view switches once the move is done)
                    waiting = []
                    for i, f in enumerate(pushed):  # at most 32 in flight (a server holds
                        if f.done() or i < len(pushed) - 32:  # so many requests, no more)
                            f.result(60)  # raises what failed
                        else:
                            waiting.append(f)
                    pushed = waiting
                    c.clock()
                    steps[w] += 1
                for f in pushed:
                    f.result(60)
                c.barrier("end", timeout=60)
            except Exception as exc:
                errors.append(exc)
                done.set()

        threads = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: min(steps) >= 3 or errors, 60, "3 steps of every worker")
            for event, ring in ((cluster.add_server, list(range(servers + 1))),
                                (lambda: cluster.remove_server(0),
                                 list(range(1, servers + 1)))):  # fmt: skip
                if late:
                    gate.clear()
                    wait_until(lambda: at_gate.is_set() or errors, 60, "worker 1 to stop")
                new_ring_pushes[0] = 0
                event()
                if late:
                    wait_until(lambda: errors or "move" in view_of(cluster.address), 60,
                               "the move to be announced", every=0.05)  # fmt: skip
                    wait_until(lambda: new_ring_pushes[0] >= 1 or errors, 60,
                               "a push of worker 0 by the new ring")  # fmt: skip
                    gate.set()
                wait_until(lambda ring=ring: errors or view_of(cluster.address)["ring"] == ring, 120,
                           f"the ring {ring}", every=0.1)  # fmt: skip
        finally:
            goal[0] = max(STEPS, *steps) + 2
            done.set()
            gate.set()
            for t in threads:
                t.join(180)
        assert errors == []
        view = view_of(cluster.address)
        assert view["ring"] == list(range(1, servers + 1)) and "move" not in view
        got_dense = np.concatenate([d.pull() for d in dense(clients[0])]) if servers == 3 else None
        rows = clients[0].sparse_table("emb", dim=DIM, optimizer=ps.optim.SGD(lr=1.0),
                                       consistency="async", init=ps.init.Zeros())  # fmt: skip
        got = rows.pull(KEYS, create=False)
        clients[0].save(tmp_path / "moved")
    counts = np.zeros(int(KEYS.max()) + 1)
    for w in range(WORKERS):
        rng = np.random.default_rng(100 + w)
        for _ in range(steps[w]):
            counts += np.bincount(rng.choice(KEYS, size=64), minlength=len(counts))
    want = -np.repeat(counts[KEYS.astype(np.int64)][:, None], DIM, axis=1)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    if replication == 2:
        check_copies(tmp_path / "moved", list(range(1, servers + 1)))
    if got_dense is not None:
        np.testing.assert_array_equal(got_dense, np.full(16, -sum(steps), np.float32))
        held = dense_held(tmp_path / "moved")
        for name in ("d0", "d2"):  # two copies, bitwise equal
            assert len(held[name]) == 2 and len(set(held[name].values())) == 1, name


def test_a_drain_leaving_fewer_servers_than_copies_is_refused_and_changes_nothing() -> None:
    # (dense tables move with replication: what stays refused is a ring shorter than the copies)
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST, log_level=LOG,
                         replication=2) as cluster:  # fmt: skip
        client = cluster.connect()
        w = client.dense_table("w", 8, optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
        w.push(np.ones(8, np.float32)).result(30)
        client.clock()
        with pytest.raises(RemoteError, match=r"replication=2 needs 2 servers and the ring"):
            cluster.remove_server(0)
        assert view_of(cluster.address)["ring"] == [0, 1]
        np.testing.assert_array_equal(w.pull(), -np.ones(8, np.float32))


def dense_held(path: Path) -> dict[str, dict[int, bytes]]:
    """Per dense table, per server, the rows (values, optimizer state, scalars) it wrote in
    the checkpoint at ``path``."""
    directory = Path(path)
    if (directory / "LATEST").exists():
        directory = directory / (directory / "LATEST").read_text().strip()
    out: dict[str, dict[int, bytes]] = {}
    for index in sorted(directory.glob("server-*/index.json")):
        idx = json.loads(index.read_text())
        for name, entry in idx["tables"].items():
            if "keys" not in entry and entry["count"]:
                rows = np.load(index.parent / entry["rows"])
                out.setdefault(name, {})[int(idx["rank"])] = rows.tobytes()
    return out


def test_dense_tables_move_their_copies_on_a_join_and_a_drain_and_change_no_bit(
    tmp_path: Path,
) -> None:
    # 3 servers, replication=2, every dense table whole on its owner and the next server:
    # bias on 0 (and 1), big on 2 (and 0), the group's g1 and g2 on 1 (and 2). The join of
    # server 3 at clock 4 moves big's copy from 0 to 3 (its primary 2 sends it while serving);
    # the drain of 0 at clock 8 gives bias to its copy on 1, and its second copy goes to 2
    # (0 sends it). Adam: its step, a scalar of every copy, moves too
    opt = ps.optim.Adam(lr=0.01)
    added: list[int] = []
    events = {4: lambda cl: added.append(cl.add_server()), 8: lambda cl: cl.remove_server(0)}
    rows, dense, errors, view = scaling_train("sync", opt, sync_grads, events, servers=3,
                                              replication=2, save=tmp_path / "moved")  # fmt: skip
    assert errors == [] and added == [3]
    assert view["ring"] == [1, 2, 3] and "move" not in view
    assert [(m["kind"], m["dense_tables"]) for m in view["moves"]] == [
        ("join", ["big"]),
        ("drain", ["bias"]),
    ]
    ref_rows, ref_dense, ref_errors, _ = scaling_train("sync", opt, sync_grads, {}, servers=3,
                                                       replication=2, save=tmp_path / "ref")  # fmt: skip
    assert ref_errors == []
    assert rows.tobytes() == ref_rows.tobytes()
    assert dense.tobytes() == ref_dense.tobytes()
    held, ref_held = dense_held(tmp_path / "moved"), dense_held(tmp_path / "ref")
    owners = {"bias": 1, "big": 2, "g1": 1, "g2": 1}
    assert sorted(held) == sorted(owners)
    for name, owner in owners.items():
        # on the two servers the final ring names, bitwise equal, and equal to the undisturbed
        # run's copies (values, optimizer state and scalars)
        assert sorted(held[name]) == sorted(replicas_of(owner, [1, 2, 3], 2)), name
        assert len({*held[name].values(), *ref_held[name].values()}) == 1, name


def test_pushes_to_dense_copies_during_moves_in_async_training_count_once() -> None:
    # SGD lr=1 on all-ones gradients: every dense element ends at minus the pushes, sparse
    # rows as NumPy counts them
    opt = ps.optim.SGD(lr=1.0)
    events = {3: lambda cl: cl.add_server(), 7: lambda cl: cl.remove_server(0)}
    rows, dense, errors, view = scaling_train("async", opt, ones_grads, events, servers=3,
                                              replication=2)  # fmt: skip
    assert errors == []
    assert view["ring"] == [1, 2, 3] and "move" not in view
    check_counts(rows, dense)
