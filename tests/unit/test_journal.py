"""The coordinator's journal: records survive the process, a torn tail is ignored, and a
membership taken back from it keeps incarnations and the view number."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from paramserver.config import Timeouts
from paramserver.coordinator.journal import Journal
from paramserver.coordinator.loop import Coordinator
from paramserver.coordinator.membership import ALIVE, DEAD, PENDING, Membership
from paramserver.spec import TableSpec
from paramserver.wire.messages import RegisterMsg

T = Timeouts(heartbeat_interval=0.5, heartbeat_timeout=5.0)


def register(rank: int) -> RegisterMsg:
    return {
        "kind": "register",
        "id": 1,
        "role": "server",
        "address": f"tcp://h:{7000 + rank}",
        "rank": rank,
        "host": "h",
        "pid": 100 + rank,
    }


def test_records_come_back_in_order_and_a_torn_tail_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(path)
    records = [{"t": "table", "spec": {"name": f"t{i}", "blob": b"\x00\x01"}} for i in range(3)]
    for r in records:
        journal.append(r)
    journal.close()
    with open(path, "ab") as f:  # a record cut short by a crash
        f.write(b"\x82\xa1t")
    again = Journal(path)
    assert again.replay() == records
    again.append({"t": "checkpoint", "latest": None})  # appending goes on after the tail
    again.close()


def test_a_membership_taken_back_keeps_incarnations_and_the_view_number() -> None:
    members = Membership(2, 1, T)
    s0, _ = members.register_server(b"id-0", register(0), 0.0)
    s1, _ = members.register_server(b"id-1", register(1), 0.0)
    members.mark_dead(s1, "test")
    members.publish("test")
    record = members.to_record()

    back = Membership(2, 1, T)
    back.load_record(record, now=50.0)
    assert back.view_number == members.view_number
    b0, b1 = back.servers
    assert (b0.state, b0.incarnation, b0.identity, b0.address) == (
        ALIVE,
        s0.incarnation,
        b"id-0",
        s0.address,
    )
    assert b1.state == DEAD
    assert back.workers[0].state == PENDING
    # a live member gets the heartbeat timeout to beat again, from the restart on
    assert b0.last_seen == 50.0 and back.expired(54.0) == []
    assert [m.name for m, _ in back.expired(56.0)] == ["server[0]"]


def test_records_written_without_fsync_survive_a_killed_process(tmp_path: Path) -> None:
    """A LocalCluster's coordinator journals without fsync (it is restarted after its process
    died, never after the machine went down): its records must be there once it was killed."""
    path = tmp_path / "j"
    code = (
        "import os, signal\n"
        "from paramserver.coordinator.journal import Journal\n"
        f"j = Journal({str(path)!r}, sync=False)\n"
        "for i in range(5):\n"
        "    j.append({'t': 'lease', 'op': 'acquire', 'h': {'i': i}})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120
    )
    assert done.returncode == -signal.SIGKILL
    got = Journal(path).replay()
    assert got == [{"t": "lease", "op": "acquire", "h": {"i": i}} for i in range(5)]


def _state(c: Coordinator) -> tuple[Any, ...]:
    members = [
        (m.role, m.rank, m.state, m.address, m.incarnation, m.identity) for m in c.members.members
    ]
    books = {k: (b.next, b.returned, b.holder.tolist(), b.finished.tolist())
             for k, b in c.leases.books.items()}  # fmt: skip
    return (c.members.view_number, members, c.members.ring, [s.to_wire() for s in c.tables.specs()],
            c.rounds.latest, books)  # fmt: skip


def _close(c: Coordinator) -> None:
    c.router.close()
    c.collector.close()
    c.ctx.term()
    assert c.journal is not None
    c.journal.close()


def _drive(c: Coordinator) -> None:
    """The same history on any coordinator: servers, a table, lease books over five epochs."""
    assert c.journal is not None
    c.members.register_server(b"id-0", register(0), 0.0)
    c.members.register_server(b"id-1", register(1), 0.0)
    c.publish("servers registered")
    spec = c.tables.create(TableSpec(name="emb", kind="sparse", dim=4, seed=1).to_wire()).to_wire()
    c.journal.append({"t": "table", "spec": spec})
    for i in range(40):
        h: Any = {"kind": "acquire_lease", "id": i, "dataset": "d", "epoch": 1 + i // 8,
                  "shards": 8, "rank": i % 2}  # fmt: skip
        c.leases.acquire(h)
        c.journal.append({"t": "lease", "op": "acquire", "h": h})
        if i % 3 == 0:
            c.publish(f"step {i}")  # through the coordinator: compacts past its size


def test_a_compacted_journal_replays_to_the_state_of_the_full_one(tmp_path: Path) -> None:
    small = Coordinator(2, 2, journal=str(tmp_path / "small"), journal_bytes=1500)
    full = Coordinator(2, 2, journal=str(tmp_path / "full"))  # never compacted: the reference
    for c in (small, full):
        _drive(c)
    sizes = ((tmp_path / "small").stat().st_size, (tmp_path / "full").stat().st_size)
    assert sizes[0] < sizes[1] and sizes[0] < 1500 + 1000
    want = _state(small)
    _close(small)
    _close(full)
    again = Coordinator(2, 2, journal=str(tmp_path / "small"))
    reference = Coordinator(2, 2, journal=str(tmp_path / "full"))
    try:
        assert _state(again) == want
        # the same history, replayed uncompacted: the same books, tables and view number
        assert _state(again)[0] == _state(reference)[0]
        assert _state(again)[2:] == _state(reference)[2:]
    finally:
        _close(again)
        _close(reference)


def _servers(path: str, n: int, replication: int = 1) -> Coordinator:
    """A journaled coordinator whose ``n`` servers registered (identities ``id-0``, ...)."""
    c = Coordinator(n, 1, journal=path, replication=replication)
    for r in range(n):
        c.members.register_server(f"id-{r}".encode(), register(r), 0.0)
    c.publish("servers registered")
    return c


def _done(c: Coordinator, identity: bytes, move: int, purpose: str = "move") -> None:
    h: Any = {"kind": "move_done", "id": 0, "move": move, "source": 0, "stats": {},
              "purpose": purpose}  # fmt: skip
    c._on_move_done(identity, h)


def test_a_move_under_way_comes_back_with_the_sources_that_did_not_report(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "journal")
    c = _servers(path, 3)
    c.scaling.queue.append(("drain", 2))
    c.scaling.start()  # move 1: ring [0, 1, 2] -> [0, 1]
    _done(c, b"id-0", 1)
    _done(c, b"id-0", 1)  # sent again after a restart: counted once
    assert c.scaling.sources == {1, 2}
    _close(c)
    again = Coordinator(3, 1, journal=path)
    try:
        assert again.members.move is not None and again.members.move["id"] == 1
        assert again.scaling.sources == {1, 2} and again.scaling.next_id == 2
        _done(again, b"id-1", 1)
        _done(again, b"id-2", 1)
        assert again.members.ring == [0, 1] and again.members.move is None
        assert again.members.servers[2].state == "left"
        assert again.tables.server_ranks == [0, 1]
        again.scaling.queue.append(("drain", 1))
        again.scaling.start()  # a new id: servers ignore one they have seen
        assert again.members.move is not None and again.members.move["id"] == 2
    finally:
        _close(again)


def test_a_rebuild_under_way_comes_back_and_a_dead_source_of_a_move_abandons_it(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "journal")
    c = _servers(path, 3, replication=2)
    c._declare_dead(c.members.servers[1], "killed")
    m, _ = c.members.register_server(b"id-1b", register(1), 0.0)
    assert m.rebuilding
    c.rebuilds.start(1)  # server[1] holds its own ranges and server[0]'s
    rb = c.members.rebuild
    assert rb is not None and sorted(s for s, _ in rb["sources"]) == [0, 2]
    _done(c, b"id-0", rb["id"], "rebuild")
    _close(c)
    again = Coordinator(3, 1, journal=path, replication=2)
    try:
        assert again.members.rebuild == rb and again.rebuilds.sources == {2}
        _done(again, b"id-2", rb["id"], "rebuild")
        assert again.members.rebuild is None and not again.members.servers[1].rebuilding
        assert [d["rank"] for d in again.rebuilds.done] == [1]
    finally:
        _close(again)
    # without replication: a source of a join dies, the join is abandoned and queued again
    c = Coordinator(2, 1, journal=str(tmp_path / "j2"))
    for r in range(2):
        c.members.register_server(f"id-{r}".encode(), register(r), 0.0)
    c.members.servers.append(type(c.members.servers[0])("server", 2))
    c.members.register_server(b"id-2", register(2), 0.0)
    c.scaling.join(2)
    assert c.members.move is not None and c.members.move["to"] == [0, 1, 2]
    c._declare_dead(c.members.servers[0], "killed")
    assert c.members.move is None and c.members.ring == [0, 1]
    assert c.scaling.queue == [("join", 2)] and "server[0] died" in c.scaling.moves[0]["abandoned"]
    c.members.register_server(b"id-0b", register(0), 0.0)
    c.scaling.start()  # every server it needs is alive again
    assert c.members.move is not None and c.members.move["id"] == 2
    _close(c)


def test_a_dense_table_placed_by_a_drain_and_one_made_after_a_join_come_back_where_they_are(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "journal")
    c = _servers(path, 2)
    dense = TableSpec(name="bias", kind="dense", dim=1, shape=(8,)).to_wire()
    c._record({"t": "table", "spec": c.tables.create(dense).to_wire()})
    assert c.tables.tables["bias"].ranges[0][0] == 0
    c.scaling.queue.append(("drain", 0))
    c.scaling.start()
    _done(c, b"id-0", 1)
    _done(c, b"id-1", 1)  # bias moved whole to server[1]
    assert [tuple(r) for r in c.tables.tables["bias"].ranges] == [(1, 0, 8)]
    want = [s.to_wire() for s in c.tables.specs()]
    _close(c)
    again = Coordinator(2, 1, journal=path)
    try:
        assert [s.to_wire() for s in again.tables.specs()] == want
        assert again.tables.server_ranks == [1] and again.scaling.next_id == 2
        made = again.tables.create(TableSpec(name="w", kind="dense", dim=1, shape=(4,)).to_wire())
        assert made.ranges[0][0] == 1  # not on the drained server
    finally:
        _close(again)
