"""Servers added and removed while training: the coordinator's side of a move.

A server that registers with a running job when no rank is free joins (``Membership`` gives it
a new rank, off the ring); ``drain`` asks that a server leave. Either becomes a *move*, one at a
time (the others wait in a queue, in order):

1. The view announces it: ``move = {id, from: ring, to: new ring, view: its number}``. The
   servers copy the rows that change owner while they serve (server/transfer.py); each worker
   routes by the new ring from its next ``clock()`` on.
2. Every source of the old ring reports ``move_done`` once its rows, the delta and its buffered
   sync pushes reached their destinations.
3. The view switches: ``ring`` is the new one, no ``move``. A drained server is then ``left``
   and told to stop.

Restarted mid-move (a journal, coordinator/journal.py): the move is in the journaled view (its
``dense`` too), and the ``scaling`` record holds the sources still to report, the queue and the
next id (:meth:`Scaling.to_record`, :meth:`Scaling.load_record`). Sources and workers go on
without the coordinator (the copy, the switches, the delta and the end are between them); a
source sends its ``move_done`` again when it sees the coordinator's process change
(server/cluster.py), so a report lost in the crash comes back, and the restarted coordinator
switches the view.

A server of the move that dies meanwhile (a source, or a destination: a joining server or a
server receiving a drained one's keys) abandons it (:meth:`Scaling.on_dead`): the view goes back
to the old ring without a ``move``, the servers drop what they had copied (sources keep their
keys), workers route by the old ring again, the abandoned move is listed in the status, and the
same join or drain is queued again: it starts once every server it needs is alive (a dead
rank's replacement registered; a joining server's replacement registers off the ring).

Sparse tables move, and so do dense ranges (``TableRegistry.replan``; the move's ``dense``:
``{name: new ranges}``): a large table, cut over several servers, is cut anew over the new set
on a join and on a drain (as a table created now would be cut); a small one stays whole where it
is unless its server leaves, then goes to the least loaded other. The registry takes the new
placement when the move is done, and places new dense tables on the ring's servers only (a
joining server once its move is done). Plain state plus the coordinator's publish and send.

With replication the copies of every owner follow the ring's members (``partition.replicas_of``)
and the servers move each key to its new copies (server/transfer.py); a move waits while a copy
is being rebuilt. Dense tables live whole with replication and stay whole: the move's ``dense``
names every table whose holders change (its owner's copies along the new ring; a leaving
owner's table goes to its first copy that stays), and its old primary copies it to each new
holder (server/recut.py).
"""

from __future__ import annotations

import logging
from typing import Any

from paramserver.coordinator.membership import ALIVE, LEFT, Member
from paramserver.coordinator.refusal import Refusal
from paramserver.coordinator.registry import DensePlan
from paramserver.coordinator.sourced import Sourced
from paramserver.wire.messages import DrainMsg, MoveDoneMsg

__all__ = ["Scaling"]

log = logging.getLogger(__name__)


class Scaling(Sourced):
    """Joins and drains of one coordinator (see the module docstring).

    Example:
        coord.scaling = Scaling(coord)
        coord.scaling.join(2)        # a server registered with rank 2 off the ring
    """

    def __init__(self, coord: Any) -> None:
        super().__init__()
        self.coord = coord  # the Coordinator: its members, tables, router and publish
        self.queue: list[tuple[str, int]] = []
        # per finished move: what it was, how long it took, the rows and bytes its sources sent
        self.moves: list[dict[str, Any]] = []

    def to_record(self) -> dict[str, Any]:
        """What a restarted coordinator needs of the moves (journaled as ``scaling``)."""
        move = self.coord.members.move
        return {"next_move": self.next_id, "queue": [[k, r] for k, r in self.queue],
                "move": None if move is None else move["id"], "sources": sorted(self.sources),
                "moves": self.moves}  # fmt: skip

    def load_record(self, rec: dict[str, Any]) -> None:
        """Take back a journaled ``scaling`` record (the view record came before it)."""
        self.next_id = int(rec.get("next_move") or self.next_id)
        self.queue = [(str(k), int(r)) for k, r in rec.get("queue") or []]
        self.moves = list(rec.get("moves") or [])
        self.journaled(rec.get("move"), rec.get("sources") or [])

    def resumed(self) -> None:
        """After the journal's replay: the move under way goes on from where it was (the
        sources that had not reported), and a server off the ring that no move names joins."""
        members, tables = self.coord.members, self.coord.tables
        move = members.move
        # the servers new dense tables go to: the ring's, less a server being drained
        drained = move["rank"] if move is not None and move["kind"] == "drain" else -1
        tables.server_ranks = [r for r in members.ring if r != drained]
        tables.count_load()
        if move is not None:
            self.resume(int(move["id"]), move["from"])
            self.sources = {r for r in self.sources if members.servers[r].state == ALIVE}
            log.warning("move %d (%s server[%d]) resumed: waiting for %s", move["id"],
                        move["kind"], move["rank"],
                        [f"server[{r}]" for r in sorted(self.sources)])  # fmt: skip
        named = {r for _, r in self.queue} | ({move["rank"]} if move else set())
        for m in members.servers:
            if m.state == ALIVE and m.rank not in members.ring and m.rank not in named:
                self.queue.append(("join", m.rank))

    def join(self, rank: int) -> None:
        """Server ``rank`` registered off the ring: move its share of the keys to it."""
        if ("join", rank) not in self.queue:
            self.queue.append(("join", rank))
        self.coord.journal_scaling()
        self.start()

    def _ready(self, rank: int) -> bool:
        """Whether every server a queued move of ``rank`` needs is alive and holds its
        copies (else it waits: a replica being rebuilt is not a source)."""
        members = self.coord.members
        return all(members.servers[r].state == ALIVE and not members.servers[r].rebuilding
                   for r in {*members.ring, rank})  # fmt: skip

    def on_dead(self, m: Member) -> None:
        """A server died (the caller publishes next): a move it takes part in is abandoned
        and queued again (see the module docstring)."""
        members = self.coord.members
        move = members.move
        if m.role != "server" or move is None or m.rank not in {*move["from"], *move["to"]}:
            return
        why = f"{m.name} died during it"
        log.error("move %d (%s server[%d]) abandoned: %s; the ring stays %s, and the %s is "
                  "queued again", move["id"], move["kind"], move["rank"], why, move["from"],
                  move["kind"])  # fmt: skip
        self.moves.append({"move": move["id"], "kind": move["kind"], "rank": move["rank"],
                           "abandoned": why,
                           "seconds": self.seconds()})  # fmt: skip
        members.move = None
        members.ring = list(move["from"])
        tables = self.coord.tables
        if move["kind"] == "drain":  # its dense tables stay where they are
            tables.server_ranks = sorted({*tables.server_ranks, move["rank"]})
            tables.count_load()
        self.sources = set()
        again = (move["kind"], move["rank"])
        if again not in self.queue and not (move["kind"] == "join" and m.rank == move["rank"]):
            self.queue.insert(0, again)  # a dead joining server's replacement joins anew
        self.coord.journal_scaling()

    def on_drain(self, identity: bytes, h: DrainMsg) -> None:
        """``drain``: check, queue, answer at once (the view says when it is done)."""
        members, rank = self.coord.members, h["rank"]
        ring = members.ring
        if members.replication > 1 and len(ring) - 1 < members.replication:
            raise Refusal(
                "invalid",
                f"server[{rank}] cannot be drained: replication={members.replication} needs "
                f"{members.replication} servers and the ring {ring} would keep "
                f"{len(ring) - 1} (add a server first; nothing changed)",
            )
        if rank not in ring or ("drain", rank) in self.queue:
            raise Refusal(
                "invalid",
                f"server[{rank}] is not on the hash ring (ring: {ring}) or already draining",
            )
        moving = members.move is not None and members.move["rank"] == rank
        if len(ring) - sum(k == "drain" for k, _ in self.queue) <= 1 or moving:
            raise Refusal("invalid", f"server[{rank}] cannot be drained: it would leave no server")
        tables = self.coord.tables
        # refused here (too_large: a range would pass Limits(table_bytes)), not once announced
        tables.replan([r for r in tables.server_ranks if r != rank])
        self.queue.append(("drain", rank))
        self.coord.journal_scaling()
        self.coord.router.reply(identity, h["id"])
        self.start()

    def start(self) -> None:
        """Announce the next queued move, unless one is under way."""
        members = self.coord.members
        if members.move is not None:
            return
        ready = [i for i, (_, r) in enumerate(self.queue) if self._ready(r)]
        if not ready:
            return
        kind, rank = self.queue.pop(ready[0])
        old = list(members.ring)
        new = sorted({*old, rank}) if kind == "join" else [r for r in old if r != rank]
        rid = self.begin(r for r in old if members.servers[r].state == ALIVE)
        members.move = {"id": rid, "from": old, "to": new, "view": members.view_number + 1,
                        "kind": kind, "rank": rank}  # fmt: skip
        tables = self.coord.tables
        ranks = sorted({*tables.server_ranks, rank}) if kind == "join" else [
            r for r in tables.server_ranks if r != rank]  # fmt: skip
        plan: DensePlan | None = None
        try:  # the dense ranges on the new set: large tables cut anew, small ones whole
            plan = tables.replan(ranks)
        except (Refusal, ValueError) as exc:  # a drain checked this when asked: tables created
            # since
            if kind == "drain":  # its dense ranges would have nowhere to go
                log.error("drain of server[%d] not started: %s", rank, exc)
                members.move = None
                self.start()
                return
            log.error("move %d: dense tables stay where they are: %s", members.move["id"], exc)
        if plan is not None and plan.specs:  # (the view, and so the journal, carries them)
            members.move["dense"] = {n: [list(r) for r in spec.ranges]
                                     for n, spec in plan.specs.items()}  # fmt: skip
        if kind == "drain":  # no new table goes to the leaving server
            tables.server_ranks = [r for r in tables.server_ranks if r != rank]
        self.coord.publish(f"move {members.move['id']}: {kind} server[{rank}], ring {old} -> {new}")
        self.coord.journal_scaling()

    def on_move_done(self, identity: bytes, h: MoveDoneMsg) -> None:
        """A source's ``move_done``: once every source's came, switch the view."""
        members = self.coord.members
        m = members.server_by_identity(identity)
        move = members.move
        if m is None or move is None or move["id"] != h["move"]:
            return
        stats = h.get("stats") or {}
        all_in = self.reported(m.rank, stats)
        if all_in is None:
            return  # sent again after a restart of this coordinator: counted already
        if stats.get("errors"):  # rows that did not arrive: said loudly, the view switches all
            # the same
            log.error("move %d: %s could not send all its rows: %s", move["id"], m.name,
                      "; ".join(str(e) for e in stats["errors"])[:2000])  # fmt: skip
        if not all_in:
            self.coord.journal_scaling()
            return
        took = self.seconds()
        record = {"move": move["id"], "kind": move["kind"], "rank": move["rank"],
                  "seconds": took, **self.totals("rows", "bytes", "dense_bytes"),
                  "dense_tables": sorted(move.get("dense") or {})}  # fmt: skip
        self.moves.append(record)
        members.ring = list(move["to"])
        members.move = None
        tables = self.coord.tables
        # the placement the move announced (its ``dense``, in the view: nothing else to keep)
        tables.moved(move.get("dense") or {})
        if move["kind"] == "join":
            tables.server_ranks = sorted({*tables.server_ranks, move["rank"]})
        else:
            tables.server_ranks = [r for r in tables.server_ranks if r != move["rank"]]
        tables.count_load()  # (tables created during the move are not in the move's dense)
        gone = members.servers[move["rank"]] if move["kind"] == "drain" else None
        if gone is not None:
            gone.state = LEFT
        self.coord.publish(
            f"move {move['id']} done in {took:.3f}s ({record['rows']} rows, {record['bytes']} "
            f"bytes): ring {members.ring}"
        )
        self.coord.journal_moved(sorted(move.get("dense") or {}))
        if gone is not None and gone.identity:
            self.coord.router.send(gone.identity, {"kind": "stop", "id": 0})
        self.start()
        self.coord.journal_scaling()
