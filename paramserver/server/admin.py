"""The server's other requests: tables (create_shard, set_lr), clocks, stats, ping, and the
set-up of a worker's faster paths (open_bulk, attach, attach_slot; see ``wire/paths.py``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from paramserver.server.state import Handlers
from paramserver.server.table import Table, check_table_bytes, make_table
from paramserver.spec import TableSpec
from paramserver.wire.messages import (
    AttachMsg,
    AttachSlotMsg,
    ClockMsg,
    CreateShardMsg,
    OpenBulkMsg,
    PingMsg,
    SetLrMsg,
    StatsMsg,
)
from paramserver.wire.paths import Request
from paramserver.wire.refusal import Refusal

__all__ = ["Admin"]

log = logging.getLogger(__name__)


class Admin(Handlers):
    """Handlers of the requests that are neither pulls nor pushes.

    Example:
        admin = Admin(state, paths, progress=server.progress)
        admin.on_ping(header, request)
    """

    def on_ping(self, h: PingMsg, req: Request) -> None:
        req.reply.ok()

    def on_create_shard(self, h: CreateShardMsg, req: Request) -> None:
        """A worker's create_shard: the table is there once the coordinator ordered it
        (``create``); a worker cannot create one itself (the loop gave the coordinator's
        order a few seconds to come: ``Server.park``)."""
        spec = TableSpec.from_wire(h["spec"])
        old = self.state.tables.get(spec.name)
        if old is None:
            why = self.state.refused_tables.get(spec.name)
            raise Refusal(
                "not_registered",
                why
                or f"table {spec.name!r} was not created through the coordinator: "
                f"{self.state.name} creates a table only when the coordinator says so "
                "(create it with client.sparse_table or client.dense_table)",
            )
        self.check_same(old, spec)
        req.reply.ok()

    def check_same(self, old: Table, spec: TableSpec) -> None:
        diff = old.spec.conflicts(spec)
        # (a dense table moving: either side of the move is this table)
        moving = bool(old.other_ranges) and spec.ranges == old.other_ranges
        if diff or (spec.ranges != old.spec.ranges and not moving):
            raise Refusal(
                "conflict",
                f"table {spec.name!r} exists on {self.state.name} with a "
                f"different {', '.join(diff) or 'placement'}",
            )

    def create(self, wire: dict[str, Any]) -> None:
        """The coordinator's order to create a table (idempotent; a refusal is kept, for the
        worker's create_shard to report)."""
        state = self.state
        spec = TableSpec.from_wire(wire)
        old = state.tables.get(spec.name)
        if old is not None:
            self.check_same(old, spec)
            return
        try:
            check_table_bytes(spec, state.rank, state.limits.table_bytes, state.name)
        except Refusal as exc:
            state.refused_tables[spec.name] = exc.message
            raise
        table = make_table(spec, state.rank, state.members, state.replication)
        table.max_bytes = state.limits.table_bytes
        state.tables[spec.name] = table
        log.info("%s: table %r created", state.name, spec.name)

    def on_set_lr(self, h: SetLrMsg, req: Request) -> None:
        t = self.state.table(h["table"])
        opt = t.spec.optimizer.with_lr(float(h["lr"]))
        new = self.state.recut.get(t.spec.name)  # a table being re-cut: both placements
        for one in [t] if new is None else [t, new]:
            if one.shard is not None:
                one.shard.set_optimizer(opt)
            one.spec = replace(one.spec, optimizer=opt)
        req.reply.ok()

    def on_clock(self, h: ClockMsg, req: Request) -> None:
        # one clock() moves a worker's clock by one: a clock message that names a later clock
        # (a bug, or a replay) moves it by one all the same; its pulls and pushes carry the
        # clock a restarted server must learn
        rank = h["rank"]
        if self.state.clocks.advance(rank, min(h["clock"], self.state.clocks.clock[rank] + 1)):
            self.progress()
        req.reply.ok()

    def on_stats(self, h: StatsMsg, req: Request) -> None:
        state = self.state
        tables = {
            name: {
                "kind": t.spec.kind,
                "rows": int(t.shard.num_rows) if t.shard is not None else 0,
                "bytes": int(t.shard.nbytes) if t.shard is not None else 0,
                "pulls": t.pulls,
                "pushes": t.pushes,
                "skipped_nonfinite": t.skipped,
            }
            for name, t in state.tables.items()
        }
        req.reply.ok(
            stats={
                "rank": state.rank,
                "pid": os.getpid(),
                "address": state.address,
                "tables": tables,
                "clocks": list(state.clocks.clock),
                "deferred": len(state.deferred),
                # pushes whose bulk payload is on its way, and their senders' requests behind
                "bulk_waiting": len(self.paths.waiting),
                "bulk_behind": sum(len(b.messages) for b in self.paths.behind.values()),
                "metrics": state.metrics.to_wire(),
            }
        )

    def on_open_bulk(self, h: OpenBulkMsg, req: Request) -> None:
        port, ticket = self.paths.open_channel(req.identity, h["rank"])
        req.reply.ok(port=port, ticket=ticket)

    def on_attach(self, h: AttachMsg, req: Request) -> None:
        t = self.state.table(h["table"], h["rank"])
        if t.spec.kind != "dense" or t.shard is None:
            raise Refusal(
                "invalid",
                f"{self.state.name} holds no range of dense table {t.spec.name!r} to share",
            )
        if req.arrays:
            raise Refusal("invalid", "attach takes no arrays")
        self.paths.attach_range(
            t.spec.name,
            h["rank"],
            h["path"],
            h["nonce"],
            t.spec.np_dtype,
            t.spec.size,
            range(t.start, t.stop),
            h.get("replies", 1),
        )
        req.reply.ok()

    def on_attach_slot(self, h: AttachSlotMsg, req: Request) -> None:
        if req.arrays:
            raise Refusal("invalid", "attach_slot takes no arrays")
        self.state.check_live(h["rank"])
        self.paths.attach_slot(h["rank"], h["slot"], h["path"], h["nonce"], h["size"])
        req.reply.ok()
