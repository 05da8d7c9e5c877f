"""Gathering the servers' stats for the status.

Every :attr:`StatsCollector.INTERVAL` seconds the coordinator's loop asks each live server
for its ``stats`` on DEALERs of its own (a server slow to answer never delays the loop), and
hands the answers to a :class:`~paramserver.coordinator.status.StatusBoard`. A request
unanswered for 10 s is given up and the connection made anew.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from paramserver.coordinator.membership import ALIVE, Member
from paramserver.coordinator.status import StatusBoard
from paramserver.wire.transport import Endpoint, Future

__all__ = ["STATS_TIMEOUT", "StatsCollector"]

STATS_TIMEOUT = 10.0  # a stats request unanswered this long is given up


class StatsCollector:
    """Asks the live servers for their stats and records the answers on ``board``.

    Example:
        collector = StatsCollector(Endpoint(ctx, request_timeout=STATS_TIMEOUT), board)
        if collector.poll(time.monotonic(), members.servers):
            snapshot = board.status(...)   # a new round of requests went out
        collector.close()
    """

    INTERVAL = 1.0

    def __init__(self, endpoint: Endpoint, board: StatusBoard) -> None:
        self.board = board
        self._inflight: dict[int, tuple[Future[dict[str, Any]], float]] = {}
        self._ep = endpoint  # closed by close()
        self._next = 0.0

    def poll(self, now: float, servers: Sequence[Member]) -> bool:
        """Take the answers that came; when the interval is up, ask every live server again
        and return True (time to rebuild the status)."""
        self._ep.poll(0)
        if now < self._next:
            return False
        self._next = now + self.INTERVAL
        for m in servers:
            name = m.name
            if m.state != ALIVE or not m.address:
                self._inflight.pop(m.rank, None)
                continue
            pending = self._inflight.get(m.rank)
            if pending is not None and not pending[0].done():
                if now - pending[1] < STATS_TIMEOUT:
                    continue
                self._ep.disconnect(name, f"{name}: stats unanswered for 10s")
            self._ep.connect(name, m.address)
            fut = self._ep.request(name, {"kind": "stats"}, what=f"stats of {name}")
            fut.add_done_callback(functools.partial(self._answered, m.rank))
            self._inflight[m.rank] = (fut, now)
        return True

    def _answered(self, rank: int, fut: Future[dict[str, Any]]) -> None:
        if fut.exception(0) is not None:
            return
        self.board.record_stats(rank, fut.result(0).get("stats"), time.monotonic())

    def close(self) -> None:
        self._ep.close()
