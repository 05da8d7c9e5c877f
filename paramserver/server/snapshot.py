"""Checkpoints on a server: its shards written at the clock boundary the coordinator named,
and loaded back when a server registers into a restored cluster (file format:
``paramserver.checkpoint``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from paramserver import checkpoint
from paramserver.partition import HashRing, owners_held
from paramserver.server.shard import DenseShard, SparseShard
from paramserver.server.state import ServerState
from paramserver.server.table import Table, make_table
from paramserver.spec import TableSpec
from paramserver.wire import protocol

__all__ = ["Snapshots", "load_rows", "restore"]

log = logging.getLogger(__name__)


class Snapshots:
    """The checkpoint the coordinator asked for, written once every live worker reached its
    clock and before any later clock is applied (see ``Server.progress``).

    Example:
        snaps = Snapshots(state)
        snaps.ask(request_id=5, path="/ckpt/000010", clock=10)
        if snaps.due(state.clocks.reached) is not None:
            message = snaps.write()        # the reply for the coordinator
    """

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.pending: tuple[int, str, int] | None = None  # (request id, directory, clock)

    def ask(self, request_id: int, path: str, clock: int) -> None:
        self.pending = (request_id, path, clock)

    def due(self, reached: int) -> int | None:
        """The clock of the pending checkpoint if the tables reached it (every live worker
        did; with none live, one did), else None."""
        if self.pending is not None and (self.state.rebuilding or self.pending[2] <= reached):
            return self.pending[2]
        return None

    def write(self) -> dict[str, Any]:
        """Write the pending checkpoint; returns the reply (or error) for the coordinator."""
        assert self.pending is not None
        rid, path, clock = self.pending
        self.pending = None
        state = self.state
        start = time.monotonic()
        try:
            index = checkpoint.write_server_shards(
                Path(path),
                state.rank,
                # a rebuilding server holds none of its ranges: the live copies write them
                {
                    n: (t.spec, t.shard, t.start, t.stop)
                    for n, t in state.tables.items()
                    if not state.rebuilding
                },
            )
        except OSError as exc:
            log.error("%s: checkpoint at clock %d into %s failed: %s", state.name, clock, path, exc)
            return protocol.error_header(rid, "io", f"{state.name}: {io_error(exc, path)}")
        log.info(
            "%s: checkpoint at clock %d written to %s in %.2fs",
            state.name,
            clock,
            path,
            time.monotonic() - start,
        )
        rows = sum(int(e["count"]) for e in index["tables"].values())
        return {"kind": "reply", "id": rid, "stats": {"rows": rows}}


def restore(state: ServerState, path: str, view: dict[str, Any], tables: list[Any]) -> None:
    """Create ``tables`` (wire specs) on this server with the rows the checkpoint at ``path``
    holds for it (a table created after the checkpoint starts empty)."""
    directory, manifest, _ = checkpoint.read_manifest(path)
    n = int(view["num_servers"])
    # the ring now (servers join and leave: coordinator/scaling.py), not the one that wrote it
    members = sorted(int(r) for r in view.get("ring") or range(n))
    ring = HashRing.build(members)
    # with replication this server holds the keys of the servers it is a copy of, too
    owners = owners_held(state.rank, members, state.replication)
    saved = {t["name"] for t in manifest["tables"]}
    for wire in tables:
        spec = TableSpec.from_wire(wire)
        table = make_table(spec, state.rank, members, state.replication)
        if spec.name in saved:  # else created after the checkpoint: starts empty
            load_rows(table, directory, manifest, ring, owners)
        state.tables[spec.name] = table
    log.info(
        "%s: restored %d tables from %s at clock %d",
        state.name,
        len(tables),
        directory,
        manifest["clock"],
    )


def load_rows(
    table: Table, directory: Path, manifest: dict[str, Any], ring: HashRing, owners: list[int]
) -> None:
    """Put into ``table``'s (new) shard the rows that the checkpoint holds for it: the sparse
    rows whose keys ``ring`` gives one of ``owners`` (the server's rank, and with replication
    the ranks it is a copy of), the elements of its dense range."""
    spec = table.spec
    if isinstance(table.shard, SparseShard):
        keys, rows = checkpoint.load_sparse_rows(directory, manifest, spec.name, ring, owners)
        if len(keys):
            table.shard.load(keys, rows.astype(spec.np_dtype, copy=False))
    elif isinstance(table.shard, DenseShard):
        dense = checkpoint.load_dense_range(directory, manifest, spec.name, table.start, table.stop)
        if dense is not None:
            table.shard.load(dense.astype(spec.np_dtype, copy=False))


def io_error(exc: OSError, path: str) -> str:
    """What went wrong writing a checkpoint, in words: "no space left on device writing PATH"
    (numpy's short write, "N requested and M written", is a full disk too, mostly)."""
    where = exc.filename or path
    if exc.errno is not None:
        return f"{os.strerror(exc.errno).lower()} writing {where}"
    text = str(exc)
    short = re.fullmatch(r"(\d+) requested and (\d+) written", text)
    if short is not None:
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = 0
        if free < int(short[1]) - int(short[2]):
            return f"no space left on device writing {where} ({text})"
    return f"{text} writing {where}"
