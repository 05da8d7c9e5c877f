"""A replica rebuilt from live copies: the coordinator's side (issue 15).

A server that takes a dead rank over under replication registers ``rebuilding``
(``Member.rebuilding``). The coordinator then announces a rebuild in the view (one at a time,
the others wait in order): ``rebuild = {id, rank, sources: [[source, [owner, ...]], ...], view}``,
where for every owner whose ranges the rank holds (``partition.holds``) the source is the first
live, not rebuilding copy of that owner other than the rank itself. The servers copy
(server/rebuild.py); each source reports ``move_done`` with ``purpose: "rebuild"``; once every
source did, the rank is ``alive``: workers read from it too.

Deaths meanwhile: a source that dies restarts the rebuild from the next live copies (a new id,
the rank's half-received rows are overwritten by the new copy); the rank itself dying ends it
(its own replacement registers ``rebuilding`` and is rebuilt in turn). An owner with no live
copy left cannot be rebuilt: the rank stays ``rebuilding`` and an error is logged.

Restarted mid-rebuild (a journal): the rebuild is in the journaled view and the ``scaling``
record holds the sources still to report (:meth:`Rebuilds.to_record`); it goes on where it
was, the sources sending their ``move_done`` again once they see the coordinator's process
change (server/cluster.py). A rank journaled ``rebuilding`` with no rebuild announced yet is
rebuilt once the restarted coordinator runs (:meth:`Rebuilds.resumed`).
"""

from __future__ import annotations

import logging
from typing import Any

from paramserver.coordinator.membership import ALIVE, Member
from paramserver.coordinator.sourced import Sourced
from paramserver.partition import owners_held, replicas_of
from paramserver.wire.messages import MoveDoneMsg

__all__ = ["Rebuilds"]

log = logging.getLogger(__name__)


class Rebuilds(Sourced):
    """The rebuilds of one coordinator (see the module docstring).

    Example:
        coord.rebuilds = Rebuilds(coord)
        coord.rebuilds.start(1)       # server[1] registered rebuilding
    """

    def __init__(self, coord: Any) -> None:
        super().__init__()
        self.coord = coord  # the Coordinator: its members and publish
        self.queue: list[int] = []
        # per finished rebuild: its rank, how long it took, the rows and bytes its sources sent
        self.done: list[dict[str, Any]] = []

    def to_record(self) -> dict[str, Any]:
        """What a restarted coordinator needs of the rebuilds (in the ``scaling`` record)."""
        rb = self.coord.members.rebuild
        return {"next_rebuild": self.next_id, "rebuild_queue": list(self.queue),
                "rebuild": None if rb is None else rb["id"],
                "rebuild_sources": sorted(self.sources), "rebuilds": self.done}  # fmt: skip

    def load_record(self, rec: dict[str, Any]) -> None:
        """Take back a journaled record of :meth:`to_record` (the view record came first)."""
        self.next_id = int(rec.get("next_rebuild") or self.next_id)
        self.queue = [int(r) for r in rec.get("rebuild_queue") or []]
        self.done = list(rec.get("rebuilds") or [])
        self.journaled(rec.get("rebuild"), rec.get("rebuild_sources") or [])

    def resumed(self) -> int | None:
        """After the journal's replay: the rebuild under way goes on (its sources that had not
        reported); a rank left ``rebuilding`` with none announced is queued. The rank to start
        a rebuild of now, if none is under way."""
        members = self.coord.members
        rb = members.rebuild
        if rb is not None:
            self.resume(int(rb["id"]), (int(s) for s, _ in rb["sources"]))
            log.warning("rebuild %d of server[%d] resumed: waiting for %s", rb["id"], rb["rank"],
                        [f"server[{r}]" for r in sorted(self.sources)])  # fmt: skip
        for m in members.servers:
            busy = rb is not None and m.rank == rb["rank"]
            if m.rebuilding and m.state == ALIVE and not busy and m.rank not in self.queue:
                self.queue.append(m.rank)
        return self.queue[0] if rb is None and self.queue else None

    def start(self, rank: int, publish: bool = True) -> None:
        """Queue a rebuild of server ``rank``; announce the next one unless one is under way."""
        members = self.coord.members
        if rank not in self.queue:
            self.queue.append(rank)
        if members.rebuild is not None:
            return
        while self.queue:
            r = self.queue.pop(0)
            m = members.servers[r]
            if not (m.rebuilding and m.state == ALIVE):
                continue
            plan = self._plan(r)
            if plan is None:
                continue
            members.rebuild = {"id": self.begin(plan), "rank": r,
                               "view": members.view_number + 1,
                               "sources": [[s, o] for s, o in sorted(plan.items())]}  # fmt: skip
            if publish:
                self.coord.publish(f"rebuild {members.rebuild['id']}: server[{r}] from "
                                   f"{sorted(plan)}")  # fmt: skip
            self.coord.journal_scaling()
            return

    def _plan(self, rank: int) -> dict[int, list[int]] | None:
        """Per source, the owners it sends; None (logged) if an owner has no live copy."""
        members = self.coord.members
        ring, k = members.ring, members.replication
        plan: dict[int, list[int]] = {}
        for owner in owners_held(rank, ring, k):
            live = [s for s in replicas_of(owner, ring, k) if s != rank and self._serves(s)]
            if not live:
                log.error("server[%d] cannot be rebuilt: no live copy of server[%d]'s ranges "
                          "is left (it stays rebuilding)", rank, owner)  # fmt: skip
                return None
            plan.setdefault(live[0], []).append(owner)
        return plan

    def _serves(self, rank: int) -> bool:
        m = self.coord.members.servers[rank]
        return bool(m.state == ALIVE and not m.rebuilding)

    def on_dead(self, m: Member) -> None:
        """A server died (the caller publishes next): a rebuild it was part of starts over
        from the other copies, or ends if it was the rank being rebuilt."""
        members = self.coord.members
        rb = members.rebuild
        if m.role != "server" or rb is None:
            return
        if m.rank != rb["rank"] and m.rank not in self.sources:
            return
        log.warning("rebuild %d: %s died: %s", rb["id"], m.name,
                    "starting over" if m.rank != rb["rank"] else "called off")  # fmt: skip
        members.rebuild = None
        self.queue = [r for r in self.queue if r != m.rank]
        if m.rank != rb["rank"]:
            self.queue.insert(0, int(rb["rank"]))
        if self.queue:
            self.start(self.queue[0], publish=False)
        self.coord.journal_scaling()

    def on_done(self, identity: bytes, h: MoveDoneMsg) -> None:
        """A source's ``move_done`` of a rebuild: once every source's came, the rank is alive."""
        members = self.coord.members
        m = members.server_by_identity(identity)
        rb = members.rebuild
        if m is None or rb is None or rb["id"] != h["move"]:
            return
        stats = h.get("stats") or {}
        if stats.get("errors"):  # the rows did not all arrive: try again from the start
            log.error("rebuild %d: %s could not send its rows: %s", rb["id"], m.name,
                      "; ".join(str(e) for e in stats["errors"])[:2000])  # fmt: skip
            members.rebuild = None
            self.start(int(rb["rank"]))
            return
        all_in = self.reported(m.rank, stats)
        if all_in is None:
            return  # sent again after a restart of this coordinator: counted already
        if not all_in:
            self.coord.journal_scaling()
            return
        took = self.seconds()
        record = {"rebuild": rb["id"], "rank": rb["rank"], "seconds": took,
                  **self.totals("rows", "bytes")}  # fmt: skip
        self.done.append(record)
        members.rebuild = None
        members.servers[rb["rank"]].rebuilding = False
        self.coord.publish(
            f"rebuild {rb['id']} done in {took:.3f}s ({record['rows']} rows, {record['bytes']} "
            f"bytes): server[{rb['rank']}] alive"
        )
        if self.queue:
            self.start(self.queue[0])
        self.coord.scaling.start()  # a join or drain that waited for this copy
        self.coord.journal_scaling()
