"""What a server's request handlers share: who it is, its tables, the workers' clocks, the
pushes it applied and the pulls that wait. Plain state; the loop and the handlers change it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from paramserver.metrics import ServerMetrics
from paramserver.server.consistency import Clocks, DeferredPulls
from paramserver.server.table import Table
from paramserver.wire.messages import PullMsg
from paramserver.wire.paths import Reply
from paramserver.wire.refusal import Refusal

__all__ = ["ServerState", "Waiting"]

# a deferred pull: (its header, where its answer goes, its keys: None for a dense table or a
# key-list signature)
Waiting = tuple[PullMsg, Reply, np.ndarray | None]


class ServerState:
    """A server's shared state (see the module docstring).

    Example:
        state = ServerState()
        state.fresh(rank=0, seq=4), state.fresh(rank=0, seq=4)   # True, False: a retry
    """

    def __init__(self) -> None:
        self.name = "server[?]"
        self.rank = -1
        self.address = ""
        self.view = 0  # the number of the newest cluster view applied
        self.tables: dict[str, Table] = {}
        self.clocks = Clocks(0)
        self.last_seq: dict[int, int] = {}  # worker rank -> sequence number of its last push
        self.deferred: DeferredPulls[Waiting] = DeferredPulls()
        self.metrics = ServerMetrics()  # latency and staleness, sent with stats

    def table(self, name: str) -> Table:
        t = self.tables.get(name)
        if t is None:
            raise Refusal("unknown_table", f"table {name!r} does not exist on {self.name}")
        return t

    def fresh(self, rank: int, seq: int) -> bool:
        """False for a retry of a push already applied; else remember ``seq``."""
        if seq <= self.last_seq.get(rank, -1):
            return False
        self.last_seq[rank] = seq
        return True

    def check_live(self, rank: int, wait: Callable[[float], None]) -> None:
        """Refuse a request of a worker that is not a live member. A restarted worker may be
        faster than the view that lets it back in: ``wait(seconds)`` (the coordinator's
        messages) is given a second to bring that view."""
        if rank not in self.clocks.live:
            deadline = time.monotonic() + 1.0
            while rank not in self.clocks.live and (left := deadline - time.monotonic()) > 0:
                wait(left)
        if rank not in self.clocks.live:
            raise Refusal("not_live", f"worker[{rank}] is not a live member in view {self.view}")
