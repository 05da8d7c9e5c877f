"""Moves and rebuilds that a death interrupts (issue 15): real processes, SIGKILL.

* the coordinator killed while a join, a drain or a rebuild is under way: LocalCluster restarts
  it from its journal, it finishes the move or the rebuild, and sync training ends bitwise equal
  to an undisturbed run;
* the joining server killed during its move: the move is abandoned (the view goes back to the
  old ring), its replacement joins in a new move, no request fails, bitwise equal;
* a source killed during a move: abandoned, queued again once the source's replacement is
  there, and done; no request fails, nothing hangs.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import PSTimeoutError
from tests.integration import test_rebuild
from tests.integration.test_recovery import view_of
from tests.integration.test_scaling import sync_grads, train
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(300)

ADAGRAD = ps.optim.Adagrad(lr=0.1)


def view_when_up(address: str) -> dict[str, Any]:
    """The coordinator's view, waiting through a restart (its first answers may be late)."""
    got: list[dict[str, Any]] = []

    def ask() -> bool:
        try:
            got.append(view_of(address))
        except PSTimeoutError:
            return False
        return True

    wait_until(ask, 60, f"the coordinator at {address} to answer")
    return got[-1]


def kill_coordinator(cluster: ps.LocalCluster) -> None:
    """SIGKILL the coordinator; return once LocalCluster started it again."""
    before = len(cluster.coordinator_restarts)
    os.kill(cluster.pids["coordinator"], signal.SIGKILL)
    wait_until(lambda: len(cluster.coordinator_restarts) > before, 30, "the coordinator's restart")


def moving(cluster: ps.LocalCluster) -> bool:
    return "move" in view_of(cluster.address)


def settled(ring: list[int]) -> Any:
    """An event that waits until the view switched to ``ring`` with no move under way."""

    def event(cluster: ps.LocalCluster) -> None:
        def done() -> bool:
            view = view_when_up(cluster.address)
            return view["ring"] == ring and "move" not in view

        wait_until(done, 90, f"the move to ring {ring} to end")

    return event


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, np.ndarray]:
    rows, dense, errors, _ = train("sync", ADAGRAD, sync_grads, {})
    assert errors == []
    return rows, dense


def test_a_coordinator_killed_during_a_join_finishes_it(
    reference: tuple[np.ndarray, np.ndarray],
) -> None:
    # worker 0 waits in the event: the move cannot end before the coordinator is killed
    def join_then_kill(cluster: ps.LocalCluster) -> None:
        assert cluster.add_server() == 2
        wait_until(lambda: moving(cluster), 30, "the join's move in the view")
        kill_coordinator(cluster)

    events = {4: join_then_kill, 10: settled([0, 1, 2])}
    rows, dense, errors, view = train("sync", ADAGRAD, sync_grads, events)
    assert errors == []
    assert view["ring"] == [0, 1, 2] and "move" not in view
    assert [st for _, _, st in view["servers"]] == ["alive", "alive", "alive"]
    assert rows.tobytes() == reference[0].tobytes()
    assert dense.tobytes() == reference[1].tobytes()


def test_a_coordinator_killed_during_a_drain_finishes_it(
    reference: tuple[np.ndarray, np.ndarray],
) -> None:
    # server[0] holds the dense tables bias and g2: they move whole with the drain
    def drain_then_kill(cluster: ps.LocalCluster) -> None:
        cluster.remove_server(0)
        wait_until(lambda: moving(cluster), 30, "the drain's move in the view")
        kill_coordinator(cluster)

    events = {4: drain_then_kill, 10: settled([1])}
    rows, dense, errors, view = train("sync", ADAGRAD, sync_grads, events)
    assert errors == []
    assert view["ring"] == [1] and "move" not in view
    assert [st for _, _, st in view["servers"]] == ["left", "alive"]
    assert rows.tobytes() == reference[0].tobytes()
    assert dense.tobytes() == reference[1].tobytes()


class CoordinatorKiller(test_rebuild.Killer):
    """test_rebuild's killer, and the coordinator killed once the rebuild of X's replacement
    is announced (before any worker switched to it: the workers wait for this step)."""

    def step(self, step: int) -> None:
        c, x = self.cluster, self.x
        if self.phase != "killed":
            super().step(step)
            return
        wait_until(lambda: test_rebuild._replaced(c, x, self.old[x]), 60, f"server[{x}] replaced")

        def announced() -> bool:
            rb = view_of(c.address).get("rebuild")
            return isinstance(rb, dict) and rb["rank"] == x

        wait_until(announced, 30, f"the rebuild of server[{x}] announced")
        kill_coordinator(c)
        view_when_up(c.address)
        print(f"coordinator killed while server[{x}] is rebuilding")
        self.phase = "rebuilding"


def test_a_coordinator_killed_during_a_rebuild_resumes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # more steps than test_rebuild's: the rebuild ends after the coordinator's restart
    monkeypatch.setattr(test_rebuild, "STEPS", 28)
    monkeypatch.setattr(test_rebuild, "Killer", CoordinatorKiller)
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    kill = (rnd.randrange(1, 8), rnd.randrange(test_rebuild.SERVERS))
    print(f"seed {seed}: server[{kill[1]}] SIGKILLed at clock {kill[0]}, then the coordinator")
    ref = test_rebuild._train_sync(1, None, seed)
    killed = test_rebuild._train_sync(2, kill, seed)
    rebuilds = killed.pop("rebuilds")
    print("rebuilds:", rebuilds)
    assert [r["rank"] for r in rebuilds][:1] == [kill[1]]
    for name in ref:
        assert ref[name].tobytes() == killed[name].tobytes(), name  # bitwise


STEPS, KEYS = 12, np.arange(1, 300, dtype=np.uint64)


def train_one(
    event: Any = None, ring: tuple[int, ...] = (0, 1, 2), servers: int = 2, replication: int = 1
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], list[Any]]:
    """One worker, sync Adagrad on a sparse and a dense table, ``servers`` servers (with
    ``replication`` > 1 an unused dense table ``pad`` first, so that ``bias`` lands on
    server[2] and its copy on 0: a join of server[3] moves that copy); ``event(cluster,
    client)`` runs after clock 3 (the worker waits for it, so it switches to no move before;
    the event returns once a move is under way again, which the worker's next steps end).
    Returns the rows, the dense values, the final view (once its ring is ``ring``), and the
    moves in the status."""
    rng = np.random.default_rng(5)
    with ps.LocalCluster(servers=servers, workers=1, timeouts=FAST,
                         replication=replication) as cluster:  # fmt: skip
        c = cluster.connect()
        emb = c.sparse_table("emb", dim=4, optimizer=ADAGRAD, consistency="sync",
                             init=ps.init.Normal(std=0.1), seed=3)  # fmt: skip
        if replication > 1:
            c.dense_table("pad", 8, optimizer=ADAGRAD, consistency="sync")
        bias = c.dense_table("bias", 8, optimizer=ADAGRAD, consistency="sync")
        for step in range(STEPS):
            keys = rng.choice(KEYS, size=64)
            emb.push(keys, sync_grads(0, step, emb.pull(keys))).result(60)
            bias.push(sync_grads(0, step, bias.pull())).result(60)
            if c.clock() == 3 and event is not None:
                event(cluster, c)
        if event is not None:  # the queued join ends once the worker's steps switched it
            settled(list(ring))(cluster)
        status = c.endpoint.request("coordinator", {"kind": "status"}, what="status").result(10)
        rows = emb.pull(KEYS, create=False)
        return rows, bias.pull(), view_of(cluster.address), status["status"]["moves"]


def abandoned(client: Any) -> list[Any]:
    ask = client.endpoint.request("coordinator", {"kind": "status"}, what="status")
    return [m for m in ask.result(10)["status"]["moves"] if m.get("abandoned")]


def join_then_kill(process: str, drain: bool = False, rank: int = 2) -> Any:
    """An event of :func:`train_one`: a server joins (or with ``drain``, server[0] is drained),
    and once its move is under way the server process ``process`` (a name of
    ``LocalCluster.pids``) is killed; it returns once the coordinator abandoned the move and
    started it again (the replacement is there)."""

    def event(cluster: ps.LocalCluster, client: Any) -> None:
        if drain:
            cluster.remove_server(0)
        else:
            assert cluster.add_server() == rank
        wait_until(lambda: moving(cluster), 30, "the join's move in the view")
        os.kill(cluster.pids[process], signal.SIGKILL)
        wait_until(lambda: abandoned(client), 60, "the move abandoned")
        wait_until(lambda: moving(cluster), 60, "the join queued again and started")

    return event


def test_a_joining_server_killed_during_its_move_abandons_it_and_its_replacement_joins() -> None:
    ref_rows, ref_bias, _, _ = train_one()
    rows, bias, view, moves = train_one(join_then_kill("server (joining, 2)"))
    print("moves:", moves)
    assert view["ring"] == [0, 1, 2] and "move" not in view
    assert "server[2] died" in moves[0]["abandoned"] and "abandoned" not in moves[-1]
    assert rows.tobytes() == ref_rows.tobytes()
    assert bias.tobytes() == ref_bias.tobytes()


def test_with_replication_a_joining_server_killed_while_a_dense_copy_moves_to_it() -> None:
    # replication 2 on 3 servers: bias on server[2] and its copy on 0; the join of server[3]
    # copies it from 2 to 3 (0 drops its copy after), and 3 is killed during that move: the
    # move is abandoned (0 keeps its copy), the replacement joins, and no bit changes
    ref_rows, ref_bias, _, _ = train_one(servers=3, replication=2)
    rows, bias, view, moves = train_one(join_then_kill("server (joining, 3)", rank=3),
                                        ring=(0, 1, 2, 3), servers=3, replication=2)  # fmt: skip
    print("moves:", moves)
    assert view["ring"] == [0, 1, 2, 3] and "move" not in view
    assert "server[3] died" in moves[0]["abandoned"] and "abandoned" not in moves[-1]
    assert moves[-1]["dense_tables"] == ["bias"]
    assert rows.tobytes() == ref_rows.tobytes()
    assert bias.tobytes() == ref_bias.tobytes()


def test_a_source_killed_during_a_move_abandons_it_and_the_join_is_done_again() -> None:
    # without replication the source's rows come back from a checkpoint (none here: its rows
    # start anew), as for any server's death; what is checked: no request fails, no hang, the
    # status says why, and the join is done once the source's replacement is there
    _, _, view, moves = train_one(join_then_kill("server 0"))
    print("moves:", moves)
    assert view["ring"] == [0, 1, 2] and "move" not in view
    assert "server[0] died" in moves[0]["abandoned"] and "abandoned" not in moves[-1]
    assert [st for _, _, st in view["servers"]] == ["alive", "alive", "alive"]


def test_a_drained_server_killed_during_its_drain_is_restarted_and_drained_again() -> None:
    # server[0] holds the dense table: the drain moves it whole, and the abandoned drain puts
    # it back; LocalCluster restarts the killed server (it did not stop on its own)
    _, _, view, moves = train_one(join_then_kill("server 0", drain=True), ring=(1,))
    print("moves:", moves)
    assert view["ring"] == [1] and "move" not in view
    assert "server[0] died" in moves[0]["abandoned"] and "abandoned" not in moves[-1]
    assert moves[-1]["dense_tables"] == ["bias"]
    assert [st for _, _, st in view["servers"]] == ["left", "alive"]
