"""The ring a worker routes sparse keys by, and its switch when servers join or leave.

:class:`RingRouting` is a part of :class:`~paramserver.client.session.Session`. The view names
the ring (``ring``: the server ranks keys are hashed over) and, while servers join or leave, a
``move`` (the old ring, the new one). A worker takes a move's new ring at the end of a step
(its next ``clock()``, or at once while it waits at a barrier), so that all of one clock's
requests go by one ring, and says so: ``switched`` to the servers of both rings, on the
connections its earlier requests took, so after them (server/transfer.py). A pull that ran
ahead of the move (after a step with no request) a source sends back (code ``moved``,
server/ahead.py): the worker then switches at once and asks again by the new ring
(:meth:`RingRouting.rerouting`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from paramserver.client.replicas import settle
from paramserver.errors import RemoteError
from paramserver.partition import HashRing
from paramserver.wire.transport import Endpoint, Future

T = TypeVar("T")

__all__ = ["RingRouting"]

log = logging.getLogger(__name__)


class RingRouting:
    """The ring a worker routes by (see the module docstring).

    Example:
        session.switch_ring()      # at a step's end: a move's new ring, if one waits
        session.servers            # the server ranks to send clocks and table orders to
    """

    rank: int
    _clock: int
    _clock_futures: list[Future[Any]]
    ring: HashRing
    # the state below is replaced, never changed in place: class defaults are safe
    ring_version = 0  # bumped at every change of the ring: the tables re-plan their keys
    ring_servers: list[int] = []  # noqa: RUF012
    move_from: list[int] = []  # noqa: RUF012  (the old ring while a move goes on)
    moves_seen: frozenset[int] = frozenset()
    next_ring: tuple[int, list[int]] | None = None  # a move's id and new ring
    next_dense: dict[str, Any] = {}  # noqa: RUF012  (a move's dense tables: their new ranges)
    dense_moved: dict[str, list[tuple[int, int, int]]] = {}  # noqa: RUF012  (switched to)
    # the ranges a move's dense tables had before this worker switched: put back if the
    # coordinator abandons that move (a server of it died)
    dense_undo: dict[str, list[tuple[int, int, int]]] = {}  # noqa: RUF012
    idle = False  # between steps (at a barrier): a move is switched to at once
    # a rebuild (server/rebuild.py): a server being rebuilt is written to (not read) from the
    # end of a step on; the rebuilds seen, the next one's (id, rank, sources, address)
    writing_to: frozenset[int] = frozenset()
    rebuilds_seen: frozenset[int] = frozenset()
    next_rebuild: tuple[int, int, list[int], str] | None = None
    _ep: Endpoint
    replaced: Counter[int]
    server_states: dict[int, str]

    if TYPE_CHECKING:  # what this mixin uses of the session it is part of (client/session.py)

        def request_server(self, s: int, header: dict[str, Any], *, what: str) -> Future[Any]: ...

    def build_ring(self, num_servers: int) -> None:
        """The ring at registration: the view's, else every server's."""
        self.ring_servers = self.ring_servers or list(range(num_servers))
        self.ring = HashRing.build(self.ring_servers)

    def end_step(self) -> None:
        """A step's end: switch to a move's ring if one waits, then send the next clock to
        every server of both rings."""
        self.switch_ring(since=self._clock + 1)
        self.switch_rebuild()
        switching = [f for f in self._clock_futures if not f.done()]
        self._clock += 1
        self._clock_futures = switching + [
            self.request_server(
                s,
                {"kind": "clock", "rank": self.rank, "clock": self._clock},
                what=f"clock {self._clock} of worker[{self.rank}] to server[{s}]",
            )
            for s in self.servers
        ]

    def take_ring(self, view: dict[str, Any]) -> None:
        """A view's ring: a move's new ring waits for the step's end; another ring is taken
        at once (the move is over, or this worker was not live during it). And its rebuild."""
        self.take_rebuild(view)
        ring, move = view.get("ring"), view.get("move")
        if isinstance(move, dict) and move.get("id") not in self.moves_seen:
            self.moves_seen = self.moves_seen | {move["id"]}
            self.move_from = [int(r) for r in move["from"]]
            if not self.ring_servers:  # registering: the old ring until the first clock()
                self.ring_servers = list(self.move_from)
            self.next_ring = (int(move["id"]), [int(r) for r in move["to"]])
            self.next_dense = dict(move.get("dense") or {})
            if self.idle:
                self.switch_ring()
        elif isinstance(ring, list) and move is None:
            # the move is over: done, or abandoned (a server of it died), whose ring is the old
            # one again, and its dense tables where they were
            self.move_from = []
            self.next_ring, self.next_dense = None, {}
            undo, self.dense_undo = self.dense_undo, {}
            if ring != self.ring_servers:
                if undo:
                    self.move_dense(undo)
                self.set_ring([int(r) for r in ring])

    def take_rebuild(self, view: dict[str, Any]) -> None:
        """A view's rebuild: writes to its server start at the step's end; a server rebuilt
        (alive) or dead is no longer written to as a rebuilding copy."""
        states = {int(r): (str(st), str(a)) for r, a, st in view.get("servers", [])}
        self.writing_to = frozenset(
            r for r in self.writing_to if states.get(r, ("", ""))[0] == "rebuilding"
        )
        rb = view.get("rebuild")
        if not isinstance(rb, dict) or int(rb["id"]) in self.rebuilds_seen:
            return
        rid, target = int(rb["id"]), int(rb["rank"])
        self.rebuilds_seen = self.rebuilds_seen | {rid}
        address = states.get(target, ("", ""))[1]
        # switched to at the step's end only (not at a barrier): the final is taken once the
        # clock after the switch completes, which the clock messages sent with it complete
        # (a target being rebuilt again turns this worker's writes down until then)
        self.next_rebuild = (rid, target, [int(s) for s, _ in rb["sources"]], address)

    def writes_to(self, s: int, address: str) -> bool:
        """Whether this worker writes to rebuilding server ``s`` at ``address``."""
        return s in self.writing_to and self._ep.address_of(f"server[{s}]") == address

    def switch_rebuild(self) -> None:
        """Write to the server being rebuilt from now on, and tell it and the sources."""
        if self.next_rebuild is None:
            return
        rid, target, sources, address = self.next_rebuild
        self.next_rebuild = None
        if not address:
            return
        old = self._ep.peers.get(f"server[{target}]")
        if old is not None and (old.address != address or old.lost is not None):
            self.replaced[target] += 1  # a new process: no shared memory of the old one
        self._ep.connect(f"server[{target}]", address)
        self.writing_to = self.writing_to | {target}
        log.info("worker[%d] writes to server[%d] (rebuild %d)", self.rank, target, rid)
        header = {"kind": "switched", "rank": self.rank, "move": rid, "clock": self._clock,
                  "purpose": "rebuild"}  # fmt: skip
        for s in sorted({*sources, target}):
            self._clock_futures.append(
                self.request_server(
                    s, header, what=f"worker[{self.rank}] writing to rebuilt server[{target}]"
                )
            )

    def switch_ring(self, since: int | None = None) -> None:
        """Route by a move's new ring from now on, and tell the servers of both rings (at a
        step's end: ``clock()``, ``barrier()``; or in a pull a source sent back, see
        :meth:`rerouting`); nothing if no move waits. ``since``: the clock of this worker's
        first request by the new ring (the current one unless at a step's end)."""
        if self.next_ring is None:
            return
        move, ring = self.next_ring
        self.next_ring = None
        targets = self.servers
        self.set_ring(ring)
        dense, self.next_dense = self.next_dense, {}
        self.dense_undo = {}
        if dense:
            self.dense_undo = {n: r for n in dense if (r := self.dense_ranges(n)) is not None}
            self.move_dense({n: [(int(s), int(a), int(b)) for s, a, b in r]
                             for n, r in dense.items()})  # fmt: skip
        header = {"kind": "switched", "rank": self.rank, "move": move, "clock": self._clock,
                  "since": self._clock if since is None else since}  # fmt: skip
        for s in targets:
            self._clock_futures.append(
                self.request_server(
                    s,
                    header,
                    what=f"worker[{self.rank}] switching to the ring of move {move}",
                )
            )

    def rerouting(
        self, parts: list[Future[Any]], again: Callable[[], Future[T]]
    ) -> Callable[[BaseException, Future[T]], bool]:
        """``gather``'s ``redo`` for a pull made of the requests ``parts`` that a source may
        send back because it ran ahead of a move (code ``moved``: server/ahead.py): switch to
        the move's new ring at once (its view came before the refusal, on the same connection),
        then, once every part is done (none still writes into the result), ask again by the new
        ring (``again``: the same pull, planned anew). Without a new ring to take (no view of
        the move came), the refusal is the pull's error.

        Example:
            gather(futs, what, combine, redo=session.rerouting(futs, pull_again))
        """
        planned = self.ring_version  # the ring the parts were sent by

        def redo(err: BaseException, group: Future[T]) -> bool:
            if not (isinstance(err, RemoteError) and err.code == "moved"):
                return False
            self.switch_ring()
            if self.ring_version == planned:
                return False
            log.info("worker[%d]: %s: switched now", self.rank, err.reason)
            _after(parts, lambda: _ask(group, again))
            return True

        return redo

    def move_dense(self, ranges: dict[str, list[tuple[int, int, int]]]) -> None:
        """Dense tables' new ranges, from this worker's switch on (the client's handles)."""

    def dense_ranges(self, name: str) -> list[tuple[int, int, int]] | None:
        """The ranges dense table ``name`` is routed by now (None: no handle of it here)."""
        return self.dense_moved.get(name)

    def set_ring(self, ring: list[int]) -> None:
        self.ring_servers = ring
        if hasattr(self, "ring"):  # registered: else built once the heartbeat runs
            self.ring = HashRing.build(ring)
            self.ring_version += 1
            log.info("worker[%d] routes by the ring of servers %s", self.rank, ring)

    def moot_when_left(self, s: int, kind: str) -> bool:
        """Whether a request of ``kind`` that server ``s`` did not answer needs no answer: the
        view says ``s`` was drained (it holds nothing, and its rank is never reused), and a
        clock, a ``switched`` or a table order changes nothing it holds (one sent just before
        the view that says so may have found it stopped)."""
        return kind in ("clock", "switched", "create_shard") and self.server_states.get(s) == "left"

    @property
    def servers(self) -> list[int]:
        """The ranks of the servers this worker talks to: the ring's, and while a move goes
        on, its sources (a drained server still answers the pulls sent to it)."""
        return sorted({*self.ring_servers, *self.move_from})


def _after(parts: list[Future[Any]], then: Callable[[], None]) -> None:
    """Call ``then`` once every one of ``parts`` is done."""
    left = [p for p in parts if not p.done()]
    if not left:
        then()
        return
    count = [len(left)]

    def one_done(_: Future[Any]) -> None:
        count[0] -= 1
        if count[0] == 0:
            then()

    for p in left:
        p.add_done_callback(one_done)


def _ask(outer: Future[T], again: Callable[[], Future[T]]) -> None:
    """Complete ``outer`` as the pull ``again()`` starts does."""
    try:
        nxt = again()
    except Exception as exc:  # e.g. the session closed meanwhile
        outer.set_exception(exc)
        return
    nxt.add_done_callback(lambda f: settle(outer, f))
