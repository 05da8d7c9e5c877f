"""What a server's request handlers share: who it is, its tables, the workers' clocks, the
pushes it applied and the pulls that wait. Plain state; the loop and the handlers change it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from paramserver.config import Limits
from paramserver.metrics import ServerMetrics
from paramserver.server.consistency import Clocks, DeferredPulls
from paramserver.server.table import Table
from paramserver.wire.messages import PullMsg
from paramserver.wire.paths import Paths, Reply
from paramserver.wire.refusal import Refusal

__all__ = ["Handlers", "ServerState", "Waiting"]

# a deferred pull: (its header, where its answer goes, its keys: None for a dense table or a
# key-list signature, the table it was sent to: a dense table re-cut meanwhile keeps both)
Waiting = tuple[PullMsg, Reply, np.ndarray | None, Table]


class ServerState:
    """A server's shared state (see the module docstring).

    Example:
        state = ServerState()
        state.fresh(rank=0, seq=4), state.fresh(rank=0, seq=4)   # True, False: a retry
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.name = "server[?]"
        self.rank = -1
        self.address = ""
        self.view = 0  # the number of the newest cluster view applied
        self.num_servers = 1
        # the hash ring's servers in the newest view (servers join and leave)
        self.ring: list[int] = []
        # copies of every range (partition.replicas_of): this server also holds the ranges of
        # the replication - 1 servers before it on the ring
        self.replication = 1
        # took over a dead rank under replication: holds none of its ranges yet, so no worker
        # reads or writes here and its checkpoints hold nothing
        self.rebuilding = False
        self.tables: dict[str, Table] = {}
        # after a rebuild (server/rebuild.py): sync pushes of clocks below this are in the
        # rows the sources sent; async ones are if their sequence number is at most the one
        # their owner's source had applied (ring, owner -> worker -> seq)
        self.sync_floor = 0
        self.rebuilt_seqs: tuple[Any, dict[int, dict[int, int]]] | None = None
        # with replication, after a move received here: the async pushes already in the rows
        # it received (server/transfer.py, Moved)
        self.moved: Any = None
        self.clocks = Clocks(0)
        self.last_seq: dict[int, int] = {}  # worker rank -> sequence number of its last push
        self.deferred: DeferredPulls[Waiting] = DeferredPulls()
        self.metrics = ServerMetrics()  # latency and staleness, sent with stats
        # worker rank -> the ZeroMQ identity that holds it here (see ``claim``)
        self.owners: dict[int, bytes] = {}
        self.registered: set[int] = set()  # the workers the newest view lists as alive
        # tables the coordinator ordered that this server could not create: name -> why
        self.refused_tables: dict[str, str] = {}
        # dense tables a move re-cuts while this server holds a range of them before and after
        # (server/transfer.py): the table of the new ranges, which the requests of the workers
        # in ``switched`` take (the others still name the old ones: ``tables``); None: all
        self.recut: dict[str, Table] = {}
        self.switched: set[int] | None = None

    def table(self, name: str, rank: int | None = None) -> Table:
        """Table ``name`` as worker ``rank`` sees it (a dense table being re-cut: the ranges
        of the ring it routes by)."""
        new = self.recut.get(name)
        if new is not None and rank is not None and self.takes_new(rank):
            return new
        t = self.tables.get(name)
        if t is None:
            raise Refusal("unknown_table", f"table {name!r} does not exist on {self.name}")
        return t

    def takes_new(self, rank: int) -> bool:
        """Whether worker ``rank`` names the new ranges of the tables being re-cut here."""
        return self.switched is None or rank in self.switched

    def check_size(self, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        """Refuse a pull or push of a sparse table carrying more keys than
        ``Limits(request_keys)``: one such request would hold the loop (and everyone waiting
        on it) for as long as its rows take, and their memory besides."""
        t = self.tables.get(h["table"])
        if t is None or t.spec.kind != "sparse" or not arrays:
            return
        n, limit = len(arrays[0]), self.limits.request_keys
        if n > limit:
            raise Refusal(
                "too_large",
                f"{h['kind']} of table {h['table']!r} carries {n} keys to {self.name}, more than "
                f"Limits(request_keys={limit}): nothing changed (send the keys in batches)",
            )

    @property
    def members(self) -> list[int]:
        """The ring's servers that copies are placed along (``partition.replicas_of``)."""
        return self.ring or list(range(self.num_servers))

    def fresh(self, rank: int, seq: int) -> bool:
        """False for a retry of a push already applied; else remember ``seq``."""
        if seq <= self.last_seq.get(rank, -1):
            return False
        self.last_seq[rank] = seq
        return True

    def claim(self, rank: int, identity: bytes) -> None:
        """Refuse a request naming worker ``rank`` unless it comes from the connection that
        holds that rank here: the first connection to name a rank that the views list as
        registered holds it until the views say the rank left or came back (``release``);
        any other is refused, so that no peer moves another worker's clock or pushes in its
        name. A rank that has not registered is held by no one."""
        if not 0 <= rank < len(self.clocks.clock):
            raise Refusal(
                "invalid",
                f"worker rank {rank} out of range: the cluster has "
                f"{len(self.clocks.clock)} workers",
            )
        if rank not in self.registered:
            raise Refusal(
                "not_live", f"worker[{rank}] is not a registered member in view {self.view}"
            )
        owner = self.owners.setdefault(rank, identity)
        if owner != identity:
            raise Refusal(
                "identity",
                f"worker[{rank}] is held by another connection on {self.name}: a message "
                "naming another worker's rank is refused and nothing changed",
            )

    def release(self, ranks: set[int]) -> None:
        """The views say ``ranks`` left or came back: their next connection may claim them."""
        for r in ranks:
            self.owners.pop(r, None)

    def check_live(self, rank: int) -> None:
        """Refuse a request of a worker that is not a live member (the loop first gives the
        coordinator's next view a second to let a restarted worker back in, without waiting
        for it: ``Server.park``)."""
        if rank not in self.clocks.live:
            raise Refusal("not_live", f"worker[{rank}] is not a live member in view {self.view}")


class Handlers:
    """What a group of request handlers works with: the server's state, the paths its
    replies take, and ``progress``, called when a request moved a worker's clock."""

    def __init__(self, state: ServerState, paths: Paths, progress: Callable[[], None]) -> None:
        self.state = state
        self.paths = paths
        self.progress = progress
