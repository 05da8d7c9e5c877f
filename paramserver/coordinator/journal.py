"""The coordinator's journal: what it must not forget when its process dies.

Records are msgpack maps appended to one file and fsynced before the coordinator answers the
request that made them; a restarted coordinator replays them (see
``Coordinator(journal=...)`` and docs/fault-tolerance.md):

* ``view``: every member (role, rank, state, address, host, pid, incarnation, the identity of
  its connection) and the view number, written whenever a new view is published;
* ``table``: a created table's spec;
* ``lease``: an acquired or completed part, or a dead worker's parts given back;
* ``checkpoint``: the newest checkpoint written (path and clock).

What it leaves out is rebuilt: the servers' clocks come with their next heartbeats, and a
barrier or a checkpoint round in progress is asked again by whoever waits for it.
A record cut short by the crash (the file's tail) is ignored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import msgpack

__all__ = ["Journal"]

log = logging.getLogger(__name__)


class Journal:
    """An append-only file of msgpack records, each fsynced.

    Example:
        journal = Journal("job/coordinator.journal")
        for record in journal.replay(): ...
        journal.append({"t": "table", "spec": spec.to_wire()})
    """

    def __init__(self, path: str | os.PathLike[str], *, sync: bool = True) -> None:
        self.path = Path(path)
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

    def close(self) -> None:
        self._file.close()
