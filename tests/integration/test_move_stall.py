"""A move announced while one worker is two clocks ahead of another in sync training.

A worker whose step sends nothing (only ``clock()``) runs a clock ahead and waits at a source
in a pull that needs the pushes of a clock the other worker, switching at that step's end,
sends to the new owner; the other worker's next pull waits at that new owner for the move's
end. Both used to wait until the request timeout (docs/fault-tolerance.md). The source now
sends the pull back (server/ahead.py) and the worker asks again by the new ring. The reference
is an undisturbed run with the same steps: the final rows are bitwise the same.

Real processes: a LocalCluster (coordinator and servers), two worker threads, each with its
own session, in this process.
"""

from __future__ import annotations

import functools
import queue
import threading

import numpy as np
import pytest

import paramserver as ps
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(120)

STEPS, DIM, IDLE = 6, 4, 3  # worker[1] sends nothing in step IDLE, only clock()
KEYS = np.arange(1, 300, dtype=np.uint64)
OPT = ps.optim.Adagrad(lr=0.1)
GROUP = [("g1", 20), ("g2", 4)]  # a dense group


def train(move: str | None, first: str) -> tuple[np.ndarray, np.ndarray, list[Exception]]:
    """Two workers, sync, every step pulls ``first`` (``emb``, ``bias`` or ``group``) then the
    others, then pushes them all. worker[1] only calls ``clock()`` in step IDLE and then waits in
    its next pull at clock IDLE + 1; worker[0], at the end of step IDLE - 1, has the main thread
    start ``move`` (``join``: a server added; ``drain``: server[0] drained), waits until its
    view announces it and ends the step (switching to the new ring)."""
    errors: list[Exception] = []
    asked: queue.Queue[str] = queue.Queue()
    answered: queue.Queue[str] = queue.Queue()
    ahead = threading.Event()
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST, log_level="warning") as cluster:
        clients = [cluster.connect(), cluster.connect(transport="tcp")]

        def work(w: int) -> None:
            try:
                c = clients[w]
                emb = c.sparse_table("emb", dim=DIM, optimizer=OPT, consistency="sync",
                                     init=ps.init.Normal(std=0.1), seed=3)  # fmt: skip
                bias = c.dense_table("bias", 8, optimizer=OPT, consistency="sync")
                group = c.dense_group([c.dense_table(n, size, optimizer=OPT, consistency="sync")
                                       for n, size in GROUP])  # fmt: skip
                rng = np.random.default_rng(100 + c.rank)
                for step in range(STEPS):
                    if c.rank == 1 and step == IDLE:
                        c.clock()
                        ahead.set()
                        continue
                    keys = rng.choice(KEYS, size=96)
                    pulls = {
                        "emb": lambda k=keys: emb.pull(k),
                        "bias": bias.pull,
                        "group": group.pull,
                    }
                    got = {n: pulls[n]() for n in sorted(pulls, key=lambda n: n != first)}
                    emb.push(keys, got["emb"] * 0.5 + 0.01 * (c.rank + 1) * (step + 1)).result(60)
                    bias.push(got["bias"] * 0.5 + 0.02 * (c.rank + 1)).result(60)
                    group.push([v * 0.5 - 0.03 * (c.rank + 1) for v in got["group"]]).result(60)
                    if c.rank == 0 and step == IDLE - 1 and move is not None:
                        assert ahead.wait(60)
                        # worker[1] waits in its pull at clock IDLE + 1 at a server
                        wait_until(lambda: sum(s["deferred"] for s in c.stats()) > 0, 60,
                                   "worker[1]'s pull to wait at a server")  # fmt: skip
                        asked.put(move)
                        answered.get(timeout=60)
                        wait_until(lambda: c.endpoint.poll(0) or "move" in c.view, 60,
                                   f"worker[0]'s view to announce the {move}")  # fmt: skip
                    c.clock()
                c.barrier("end", timeout=60)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        if move is not None:
            kind = asked.get(timeout=120)
            if kind == "join":
                cluster.add_server()
            else:
                cluster.remove_server(0)
            answered.put(kind)
        for t in threads:
            t.join(100)
        reader = clients[0]
        emb = reader.sparse_table("emb", dim=DIM, optimizer=OPT, consistency="sync",
                                  init=ps.init.Normal(std=0.1), seed=3)  # fmt: skip
        dense = [reader.dense_table(n, size, optimizer=OPT, consistency="sync")
                 for n, size in [("bias", 8), *GROUP]]  # fmt: skip
        if move is not None and not errors:
            wait_until(lambda: reader.endpoint.poll(0) or "move" not in reader.view, 60,
                       "the move to end")  # fmt: skip
            want = [0, 1, 2] if move == "join" else [1]
            assert reader.view["ring"] == want
        return emb.pull(KEYS, create=False), np.concatenate([d.pull() for d in dense]), errors


@functools.cache
def reference() -> tuple[np.ndarray, np.ndarray, list[Exception]]:
    """The undisturbed run (the order of a step's pulls changes no value)."""
    return train(None, "emb")


@pytest.mark.parametrize(
    ("move", "first"), [("join", "emb"), ("drain", "bias"), ("drain", "group")]
)
def test_a_move_announced_while_a_worker_is_a_clock_ahead_neither_stalls_nor_changes_a_bit(
    move: str, first: str
) -> None:
    # join: the waiting pull is of the sparse table, whose keys move to the new server;
    # drain: of a dense table or a dense group's tables on server[0], which move to server[1]
    rows, dense, errors = train(move, first)
    assert errors == []
    ref_rows, ref_dense, ref_errors = reference()
    assert ref_errors == []
    assert rows.tobytes() == ref_rows.tobytes()
    assert dense.tobytes() == ref_dense.tobytes()
