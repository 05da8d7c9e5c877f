"""The coordinator's journal: what it must not forget when its process dies.

Records are msgpack maps appended to one file and fsynced before the coordinator answers the
request that made them; a restarted coordinator replays them (see
``Coordinator(journal=...)`` and docs/fault-tolerance.md):

* ``view``: every member (role, rank, state, address, host, pid, incarnation, the identity of
  its connection) and the view number, written whenever a new view is published;
* ``table``: a created table's spec;
* ``lease``: an acquired or completed part, or a dead worker's parts given back;
* ``checkpoint``: the newest checkpoint written (path and clock);
* ``scaling``: where the moves and rebuilds stand (the sources still to report, the queues,
  the next ids, the finished ones; coordinator/scaling.py and rebuild.py), written at each of
  their steps; the move or rebuild itself is in the ``view`` record. A ``table`` record is
  written again for a dense table a move placed anew (the last one of a name counts).

What it leaves out is rebuilt: the servers' clocks come with their next heartbeats, and a
barrier or a checkpoint round in progress is asked again by whoever waits for it.
A record cut short by the crash (the file's tail) is ignored.

Compaction: once the file passes ``compact_bytes``, the coordinator rewrites it as the records
of its current state (the view, the tables, the newest checkpoint, the lease books), written to
a new file, fsynced, and renamed over the old one (the directory fsynced too): a crash leaves
either the old journal or the new one, never half of one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import msgpack

from paramserver.checkpoint import fsync_dir

__all__ = ["COMPACT_BYTES", "Journal", "replay", "scaling_record", "state_records"]

COMPACT_BYTES = 8 << 20  # a journal past this size is rewritten as the current state

log = logging.getLogger(__name__)


class Journal:
    """An append-only file of msgpack records, each fsynced.

    Example:
        journal = Journal("job/coordinator.journal")
        for record in journal.replay(): ...
        journal.append({"t": "table", "spec": spec.to_wire()})
    """

    def __init__(
        self, path: str | os.PathLike[str], compact_bytes: int = COMPACT_BYTES, *, sync: bool = True
    ) -> None:
        self.path = Path(path)
        self.compact_bytes = compact_bytes
        # False: written through to the page cache only, which outlives the process (what a
        # coordinator that dies with its launcher, a LocalCluster's, is restarted after), not
        # the machine; an fsync took 0.3-30 ms of the coordinator's loop per record
        self.sync = sync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 (held open for the coordinator's life)

    def replay(self) -> list[dict[str, Any]]:
        """The records written so far, in order (a torn last record is left out)."""
        records: list[dict[str, Any]] = []
        with open(self.path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
            try:
                for record in unpacker:
                    if isinstance(record, dict):
                        records.append(record)
            except (msgpack.OutOfData, ValueError) as exc:
                log.warning("journal %s: ignoring a torn record at its end (%s)", self.path, exc)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` and make it durable (fsync, unless ``sync`` is off) before
        returning."""
        self._file.write(msgpack.packb(record, use_bin_type=True))
        self._file.flush()
        if self.sync:
            os.fsync(self._file.fileno())

    def needs_compaction(self) -> bool:
        """Whether the file passed ``compact_bytes`` (see :meth:`compact`)."""
        return self._file.tell() > self.compact_bytes

    def compact(self, records: list[dict[str, Any]]) -> None:
        """Replace the journal by ``records`` (the current state) atomically: a new file,
        fsynced, renamed over the old one, the directory fsynced."""
        tmp = self.path.with_name(self.path.name + ".compact")
        with open(tmp, "wb") as f:
            for record in records:
                f.write(msgpack.packb(record, use_bin_type=True))
            f.flush()
            os.fsync(f.fileno())
        before = self._file.tell()
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._file.close()
        self._file = open(self.path, "ab")  # noqa: SIM115 (held open for the coordinator's life)
        log.info("journal %s compacted: %d bytes -> %d (%d records)", self.path, before,
                 self._file.tell(), len(records))  # fmt: skip

    def close(self) -> None:
        self._file.close()


def scaling_record(coord: Any) -> dict[str, Any]:
    """The ``scaling`` record of coordinator ``coord``: its moves and rebuilds."""
    return {"t": "scaling", **coord.scaling.to_record(), **coord.rebuilds.to_record()}


def state_records(coord: Any) -> list[dict[str, Any]]:
    """Coordinator ``coord``'s current state as journal records (what compaction writes)."""
    return [
        coord.members.to_record(),
        *({"t": "table", "spec": spec.to_wire()} for spec in coord.tables.specs()),
        {"t": "checkpoint", "latest": coord.rounds.latest},
        coord.leases.to_record(),
        scaling_record(coord),
    ]


def replay(coord: Any, records: list[dict[str, Any]], now: float) -> int | None:
    """Take back into coordinator ``coord`` what a previous coordinator process journaled.
    Returns the rank whose rebuild the restarted coordinator announces first, if any."""
    views = 0
    for rec in records:
        if rec["t"] == "view":
            coord.members.load_record(rec, now)
            views += 1
        elif rec["t"] == "table":
            coord.tables.load(rec["spec"])  # where it was placed, moves included
        elif rec["t"] == "scaling":
            coord.scaling.load_record(rec)
            coord.rebuilds.load_record(rec)
        elif rec["t"] == "checkpoint":
            coord.rounds.latest = rec["latest"]
        elif rec["t"] == "leases":
            coord.leases.load_record(rec)
        elif rec["op"] == "acquire":
            coord.leases.acquire(rec["h"])
        elif rec["op"] == "complete":
            coord.leases.complete(rec["h"])
        else:
            coord.leases.requeue(rec["rank"], rec["name"])
    if not views:
        return None
    coord.scaling.resumed()
    log.warning("coordinator restarted: view %d, %d tables, from %d journal records",
                coord.members.view_number, len(coord.tables.specs()), len(records))  # fmt: skip
    rank: int | None = coord.rebuilds.resumed()
    return rank
