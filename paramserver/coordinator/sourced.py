"""What a move (scaling.py) and a rebuild (rebuild.py) keep alike on the coordinator: ids handed
out in turn, the source servers still to send their ``move_done``, when the one under way
started, the sources' stats, and what a journal said of it.

Example:
    work = Sourced()
    rid = work.begin({0, 1})                 # announce rid with sources server[0], server[1]
    work.reported(0, {"rows": 10})           # False: server[1] still to report
    work.reported(1, {"rows": 5})            # True: all in
    work.totals("rows")                      # {"rows": 15}
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

__all__ = ["Sourced"]


class Sourced:
    """The bookkeeping of one coordinator-run transfer at a time (see the module docstring)."""

    def __init__(self) -> None:
        self.sources: set[int] = set()
        self.next_id = 1
        self.started = 0.0
        self._stats: list[dict[str, Any]] = []
        # from the journal: the one under way then, and its sources that had not reported
        self._journaled: tuple[int | None, set[int]] = (None, set())

    def begin(self, sources: Iterable[int]) -> int:
        """A new one announced, waiting for ``sources``: its id."""
        rid = self.next_id
        self.next_id += 1
        self.sources = set(sources)
        self.started = time.monotonic()
        self._stats = []
        return rid

    def journaled(self, rid: Any, sources: Iterable[Any]) -> None:
        """Take back what a journal said: the id under way then and the sources still to
        report (a record's ``next_id`` is set by the caller, whose journal key it knows)."""
        self._journaled = (None if rid is None else int(rid), {int(r) for r in sources})

    def resume(self, rid: int, announced: Iterable[int]) -> None:
        """After a journal's replay, ``rid`` under way goes on: its sources still to report
        are the journal's, or all those ``announced`` where the journal did not name it."""
        self.next_id = max(self.next_id, rid + 1)
        jid, left = self._journaled
        self.sources = set(left) if jid == rid else set(announced)
        self.started = time.monotonic()

    def reported(self, rank: int, stats: dict[str, Any]) -> bool | None:
        """Source ``rank`` reported with ``stats``: whether every source has now (None where
        ``rank`` was not waited for: a report sent again to a restarted coordinator)."""
        if rank not in self.sources:
            return None
        self.sources.discard(rank)
        self._stats.append(stats)
        return not self.sources

    def seconds(self) -> float:
        """How long the one under way has taken so far."""
        return time.monotonic() - self.started

    def totals(self, *fields: str) -> dict[str, int]:
        """The sources' stats ``fields`` summed."""
        return {f: sum(int(s.get(f, 0)) for s in self._stats) for f in fields}
