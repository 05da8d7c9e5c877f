"""A replaced replica rebuilt from live copies while training goes on (issue 15). Real
processes, SIGKILL.

Server X is killed at a random clock; its replacement registers ``rebuilding`` and is rebuilt
from the live copies (server/rebuild.py); once the view lists it alive, the other copy Y of X's
ranges is killed too. Without the rebuild, X's ranges would then have no copy left.

* sync: the final weights (sparse and dense) are bitwise equal to an uninterrupted run without
  replication on the same data;
* async, SGD lr 1 of all-ones gradients: every value is minus the number of acknowledged
  pushes that held it (nothing lost, nothing applied twice on the rebuilt copy);
* a source killed mid-rebuild (replication 3: the rebuild starts over from the copy left), and
  the replacement itself killed mid-rebuild (its own replacement is rebuilt): bitwise equal.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from tests.integration.test_recovery import view_of
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(300)

SERVERS, WORKERS, STEPS, KEYS = 3, 2, 16, 600


def _state(cluster: ps.LocalCluster, rank: int) -> tuple[str, str]:
    view: Any = view_of(cluster.address)
    return next((str(st), str(a)) for r, a, st in view["servers"] if r == rank)


def _replaced(cluster: ps.LocalCluster, rank: int, old: str) -> bool:
    """Whether a new process holds ``rank`` (rebuilding, or already rebuilt)."""
    state, address = _state(cluster, rank)
    return address != old and state in ("rebuilding", "alive")


class Killer:
    """Kills server X at ``at``; once X's replacement is rebuilt (the view lists it alive at a
    new address), kills Y (the other copy of X's ranges) at the start of the next step. With
    ``source``, Y is killed as soon as X's replacement registered, before the workers' next
    step: the rebuild must start over from the remaining copies (replication 3)."""

    def __init__(
        self, cluster: ps.LocalCluster, at: int, x: int, source: bool = False, target: int = 0
    ) -> None:
        self.cluster, self.at, self.x, self.y = cluster, at, x, (x + 1) % SERVERS
        self.old = {r: "" for r in range(SERVERS)}
        self.phase = "before"
        self.source = source
        self.target = target  # times X's replacement is killed again while being rebuilt

    def kill(self, rank: int) -> None:
        self.old[rank] = _state(self.cluster, rank)[1]
        os.kill(self.cluster.pids[f"server {rank}"], signal.SIGKILL)

    def step(self, step: int) -> None:
        c, x, y = self.cluster, self.x, self.y
        if self.phase == "before" and step == self.at:
            self.kill(x)
            self.phase = "killed"
        elif self.phase == "killed":
            # the replacement registers (rebuilding): the workers then write to it from the
            # end of this step and the copy finishes once the next clock completes
            wait_until(lambda: _replaced(c, x, self.old[x]), 60, f"server[{x}] replaced")
            if self.target and _state(c, x)[0] == "rebuilding":
                print(f"server[{x}]'s replacement killed while rebuilding")
                self.target -= 1
                self.kill(x)  # its own replacement is rebuilt in turn
            elif self.source:
                print(f"server[{y}] killed while server[{x}] is {_state(c, x)[0]}")
                self.kill(y)
                self.phase = "second"
            else:
                self.phase = "rebuilding"
        elif self.phase == "rebuilding":
            if _state(c, x)[0] == "alive":
                self.kill(y)
                self.phase = "second"
        elif self.phase == "second":
            wait_until(lambda: _replaced(c, y, self.old[y]), 60, f"server[{y}] replaced")
            self.phase = "done"


def _batches(seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, KEYS, 300).astype(np.uint64) for _ in range(WORKERS)] for _ in range(STEPS)
    ]


def _train_sync(
    replication: int,
    kill: tuple[int, int] | None,
    seed: int,
    source: bool = False,
    target: int = 0,
) -> dict[str, Any]:
    batches = _batches(seed)
    with ps.LocalCluster(
        servers=SERVERS, workers=WORKERS, timeouts=FAST, replication=replication
    ) as cluster:
        killer = None if kill is None else Killer(cluster, *kill, source=source, target=target)
        clients = [cluster.connect(rank=r) for r in range(WORKERS)]
        tables = [
            (
                c.sparse_table("emb", dim=8, optimizer=ps.optim.SGD(lr=0.1), consistency="sync",
                               init=ps.init.Normal(0.0, 0.1)),
                c.dense_table("w", shape=(3000,), optimizer=ps.optim.SGD(lr=0.1),
                              consistency="sync"),
                c.dense_table("b", shape=(7,), optimizer=ps.optim.SGD(lr=0.1), consistency="sync"),
            )
            for c in clients
        ]  # fmt: skip
        for step in range(STEPS):
            if killer is not None:
                killer.step(step)
            for r, (emb, w, b) in enumerate(tables):
                keys = batches[step][r]
                rows = emb.pull(keys)
                wv, bv = w.pull(), b.pull()
                grads = (rows * np.float32(0.5) + np.float32(r + 1)).astype(np.float32)
                futs = [
                    emb.push(keys, grads),
                    w.push((wv * np.float32(0.3) + np.float32(step)).astype(np.float32)),
                    b.push((bv - np.float32(1.0)).astype(np.float32)),
                ]
                for f in futs:
                    f.result()
            for c in clients:
                c.clock()
        emb, w, b = tables[0]
        out = {"emb": emb.pull(np.arange(KEYS, dtype=np.uint64)), "w": w.pull(), "b": b.pull()}
        if killer is not None:
            assert killer.phase == "done", f"the rebuild did not finish in time: {killer.phase}"
            ask = clients[0].endpoint.request("coordinator", {"kind": "status"}, what="status")
            out["rebuilds"] = ask.result(10)["status"]["rebuilds"]
        return out


def test_sync_a_rebuilt_copy_survives_the_death_of_the_other_copy() -> None:
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    kill = (rnd.randrange(1, STEPS - 9), rnd.randrange(SERVERS))
    print(f"seed {seed}: server[{kill[1]}] SIGKILLed at clock {kill[0]}, then its other copy")
    reference = _train_sync(1, None, seed)
    killed = _train_sync(2, kill, seed)
    print("rebuilds:", killed.pop("rebuilds"))
    for name in reference:
        assert reference[name].dtype == killed[name].dtype
        np.testing.assert_array_equal(killed[name], reference[name], err_msg=name)
        assert reference[name].tobytes() == killed[name].tobytes(), name  # bitwise


def test_sync_a_rebuild_whose_source_dies_starts_over_from_another_copy() -> None:
    """Replication 3 on 3 servers: X's replacement is rebuilt from the first live copy of
    each range; that source is killed before the copy can finish, and the rebuild starts over
    from the copy left (the coordinator's restart), then the source's replacement is rebuilt."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    kill = (rnd.randrange(1, STEPS - 9), rnd.randrange(SERVERS))
    print(f"seed {seed}: server[{kill[1]}] SIGKILLed at clock {kill[0]}, then a source")
    reference = _train_sync(1, None, seed)
    killed = _train_sync(3, kill, seed, source=True)
    print("rebuilds:", killed.pop("rebuilds"))
    for name in reference:
        assert reference[name].tobytes() == killed[name].tobytes(), name  # bitwise


def test_sync_a_rebuilding_server_killed_is_rebuilt_again() -> None:
    """X's replacement is killed while it is being rebuilt: its rebuild ends, the next
    replacement is rebuilt, then the other copy of X's ranges dies; bitwise equal still."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    kill = (rnd.randrange(1, STEPS - 10), rnd.randrange(SERVERS))
    print(f"seed {seed}: server[{kill[1]}] SIGKILLed at clock {kill[0]}, then its replacement")
    reference = _train_sync(1, None, seed)
    killed = _train_sync(2, kill, seed, target=1)
    print("rebuilds:", killed.pop("rebuilds"))
    for name in reference:
        assert reference[name].tobytes() == killed[name].tobytes(), name  # bitwise


def test_async_a_rebuilt_copy_holds_every_acknowledged_push_once() -> None:
    """Worker 0 ends a step (clock) every step, worker 1 every fourth: worker 0 writes to the
    replacement for several steps before worker 1 switches, so the sources' final rows already
    hold pushes the replacement also received (and must not apply twice)."""
    seed = random.randrange(1 << 30)
    rng = np.random.default_rng(seed)
    steps = 48
    x = int(rng.integers(SERVERS))
    print(f"seed {seed}: server[{x}] SIGKILLed, then its other copy")
    with ps.LocalCluster(servers=SERVERS, workers=2, timeouts=FAST, replication=2) as cluster:
        killer = Killer(cluster, int(rng.integers(2, 10)), x)
        clients = [cluster.connect(rank=r) for r in range(2)]
        tables = [
            (
                c.sparse_table("emb", dim=4, optimizer=ps.optim.SGD(lr=1.0),
                               consistency="async", init=ps.init.Zeros()),
                c.dense_table("d", shape=(500,), optimizer=ps.optim.SGD(lr=1.0),
                              consistency="async"),
            )
            for c in clients
        ]  # fmt: skip
        counts = np.zeros(KEYS, np.int64)
        dense_acks = 0
        pending: list[list[Any]] = [[], []]

        def settle(r: int, keep: int) -> None:
            nonlocal dense_acks
            while len(pending[r]) > keep:
                k, f1, f2 = pending[r].pop(0)
                f1.result()  # raises if not every copy it went to acknowledged it
                counts[k.astype(np.int64)] += 1
                f2.result()
                dense_acks += 1

        for step in range(steps):
            killer.step(step)
            for r, (emb, dense) in enumerate(tables):
                keys = rng.choice(KEYS, size=200, replace=False).astype(np.uint64)
                ones = np.ones((len(keys), 4), np.float32)
                # two pushes in flight at once, acknowledged later: the kills and the switch
                # to the rebuilt copy find some unanswered
                pending[r].append(
                    (keys, emb.push(keys, ones), dense.push(np.ones(500, np.float32)))
                )
                settle(r, 2)
                if r == 0 or step % 4 == 3:
                    clients[r].clock()
        settle(0, 0)
        settle(1, 0)
        assert killer.phase == "done", f"the rebuild did not finish in time: {killer.phase}"
        emb, dense = tables[0]
        rows = emb.pull(np.arange(KEYS, dtype=np.uint64))
        np.testing.assert_array_equal(
            rows, -np.repeat(counts[:, None], 4, axis=1).astype(np.float32)
        )
        np.testing.assert_array_equal(dense.pull(), np.full(500, -dense_acks, np.float32))
        assert dense_acks == 2 * steps
