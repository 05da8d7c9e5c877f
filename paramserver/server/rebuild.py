"""A replica rebuilt from live copies: the server's side (issue 15).

Under ``replication=k`` a server B that took a dead rank over registers ``rebuilding``: it holds
nothing. The coordinator (coordinator/rebuild.py) announces in the view a ``rebuild`` =
``{id, rank: B, sources: [[A, [owner, ...]], ...], view}``: for every owner whose ranges B holds
(``partition.holds``), one live copy A sends them. The steps are a move's
(server/transfer.py), in ``transfer`` messages with ``purpose: "rebuild"`` on one connection
from A to B:

1. ``copy`` (per sparse table): the rows of every key A holds whose ring owner is one of A's
   owners in the rebuild. A serves on.
2. The workers start writing to B too (a copy nobody reads) at the end of a step and say so:
   ``switched`` (``purpose: "rebuild"``, with the clock ``c_w`` they end) to the sources and to
   B. Every push of a clock > ``c_w`` of worker w reaches B.
3. ``final``: once every live worker switched, with ``c = max c_w``, A sends the state at the
   completed clock ``T = c + 1`` (every clock < T applied, none later: taken inside the clock
   step that reaches T, ``due``): the sparse rows changed since the copy, every dense table
   A sends whole, and ``clock: T``. Every source takes the same T (the same workers' switched).
   Async and ssp tables also get A's last applied sequence number of each worker (``seqs``).
4. ``end``. B holds (parks) every worker request from the view of the rebuild until the end of
   every source came, answering pushes and clocks at once (server/loop.py ``EARLY``: nobody
   reads B before, and no worker must wait for another's switch); then it sets every worker's clock to at least T, drops the pushes of
   sync clocks < T (A's rows hold them: ``ServerState.sync_floor``), applies only the async
   pushes whose sequence number is above what its owner's source had applied
   (``ServerState.rebuilt_seqs``), and handles its held requests in order. The source tells
   the coordinator (``move_done`` with ``purpose: "rebuild"``), which lists B ``alive`` once
   every source did.

A rebuild started over (its source died: a new id, new sources) finds workers writing to B
already: B turns down (code ``rebuilding``, which the worker takes as done) what a worker sends
before its ``switched`` for the new id (the new final holds it), so that no step waits on B.

Sync result: B's rows at T are A's; every push of a clock >= T reaches B and is aggregated as
on A, so B is bitwise a copy. Async result: a worker's pushes reach A and B in the order it
sent them, so A's last sequence number of w at the final splits w's pushes into those in A's
rows and those B applies itself: none twice, none missed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserver.partition import HashRing
from paramserver.server.shard import SparseShard
from paramserver.server.shard.dense import DenseShard
from paramserver.server.state import ServerState
from paramserver.server.table import Table
from paramserver.server.transfer import changed_rows
from paramserver.wire.paths import Request
from paramserver.wire.refusal import Refusal
from paramserver.wire.transport import Endpoint, Future

__all__ = ["Rebuilds", "already_applied"]

log = logging.getLogger(__name__)

PURPOSE = "rebuild"


@dataclass
class Sending:
    """A rebuild as one of its sources sees it."""

    id: int
    view: int
    dest: int
    owners: list[int]
    ring: HashRing
    base: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    switched: dict[int, int] = field(default_factory=dict)  # worker -> the clock it ended
    target: int | None = None  # T: the clock the final is taken at
    finished: bool = False
    end: Future[Any] | None = None
    started: float = 0.0
    bytes: int = 0
    rows: int = 0


@dataclass
class Receiving:
    """A rebuild as the server being rebuilt sees it."""

    id: int
    sources: dict[int, list[int]]  # source -> its owners
    ring: HashRing
    clock: int = 0  # T, from the finals
    seqs: dict[int, dict[int, int]] = field(default_factory=dict)  # owner -> worker -> seq
    switched: set[int] = field(default_factory=set)  # workers writing here for this rebuild
    lost: bool = False  # a held request was given up (it waited the request timeout)


class Rebuilds:
    """A server's rebuilds, as source and as the server rebuilt (see the module docstring).

    Example:
        rebuilds = Rebuilds(state, transfers.endpoint, progress, apply_sync, tell)
        rebuilds.on_view(view)    # a view with a ``rebuild`` starts it
    """

    def __init__(
        self,
        state: ServerState,
        endpoint: Endpoint,
        progress: Callable[[], None],
        apply_sync: Callable[[int], None],
        tell: Callable[[dict[str, Any]], None],
    ) -> None:
        self.state = state
        self.endpoint = endpoint
        self.progress = progress
        self.apply_sync = apply_sync
        self.tell = tell
        self.out: Sending | None = None
        self.incoming: Receiving | None = None
        self.seen: set[int] = set()
        self.early: dict[int, dict[int, int]] = {}
        self.held: set[int] = set()  # workers with a request held here (see ``holds``)

    # ---- views ----------------------------------------------------------------------------

    def on_view(self, view: dict[str, Any]) -> None:
        """Start the rebuild a view announces (once); forget one the view no longer has."""
        rb = view.get("rebuild")
        me = self.state.rank
        if not isinstance(rb, dict):
            if self.out is not None and not self.out.finished:
                log.warning("%s: rebuild %d called off", self.state.name, self.out.id)
                self.out = None
            return
        rid = int(rb["id"])
        if self.out is not None and self.out.id != rid:
            self.out = None  # superseded (a source or the target died): a new one is announced
        if rid in self.seen:
            return
        self.seen.add(rid)
        dest = int(rb["rank"])
        ring = HashRing.build([int(r) for r in view.get("ring") or []])
        sources = {int(s): [int(o) for o in owners] for s, owners in rb["sources"]}
        if dest == me:
            self.incoming = Receiving(rid, sources, ring)
            log.info("%s: rebuild %d: receiving from %s", self.state.name, rid, sorted(sources))
            return
        if me not in sources:
            return
        for rank, address, _status in view.get("servers", []):
            if rank == dest and address:
                self.endpoint.connect(f"server[{dest}]", address)
        out = Sending(rid, int(rb["view"]), dest, sources[me], ring)
        out.started = time.monotonic()
        out.switched = self.early.pop(rid, {})
        self.out = out
        for name, t in self.state.tables.items():
            if isinstance(t.shard, SparseShard):
                keys, rows = self._mine(out, t.shard)
                out.base[name] = (keys, rows)
                self._send(out, name, "copy", [keys, rows])
        log.info("%s: rebuild %d: copy sent to server[%d]", self.state.name, rid, dest)

    def _mine(self, out: Sending, shard: SparseShard) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``shard`` whose keys ``out``'s owners own on the ring."""
        rows = shard.export()
        keys = rows["keys"]
        if len(keys) == 0:
            return keys, rows["rows"]
        sel = np.isin(out.ring.route(keys).astype(np.int64), np.asarray(out.owners, np.int64))
        return keys[sel], rows["rows"][sel]

    def _send(self, out: Sending, table: str | None, phase: str, arrays: list[np.ndarray],
              **extra: Any) -> Future[Any]:  # fmt: skip
        header: dict[str, Any] = {"kind": "transfer", "move": out.id, "phase": phase,
                                  "source": self.state.rank, "view": out.view,
                                  "purpose": PURPOSE, **extra}  # fmt: skip
        if table is not None:
            header["table"] = table
        arrays = [np.ascontiguousarray(a) for a in arrays]
        out.bytes += sum(a.nbytes for a in arrays)
        out.rows += len(arrays[0]) if arrays else 0
        return self.endpoint.request(
            f"server[{out.dest}]", header, arrays,
            what=f"{phase} of rebuild {out.id} to server[{out.dest}]",
        )  # fmt: skip

    # ---- the source -----------------------------------------------------------------------

    def on_switched(self, rank: int, rid: int, clock: int) -> None:
        """A worker writes to the server being rebuilt from the end of its step ``clock`` on."""
        out = self.out
        if out is not None and out.id == rid:
            out.switched[rank] = clock
        elif rid not in self.seen:
            self.early.setdefault(rid, {})[rank] = clock

    def due(self, low: int) -> int | None:
        """The clock to apply the sync pushes below before the final, if it is time."""
        out = self.out
        if out is None or out.finished:
            return None
        live = self.state.clocks.live
        if not live <= set(out.switched):
            return None
        if out.target is None:
            out.target = max((out.switched[r] for r in live), default=0) + 1
        return out.target if low >= out.target else None

    def finish(self) -> None:
        """Phase 3 and 4: the state at clock T (every sync clock < T applied), then the end."""
        out = self.out
        assert out is not None and out.target is not None
        out.finished = True
        for name, t in self.state.tables.items():
            if isinstance(t.shard, SparseShard):
                keys, rows = self._mine(out, t.shard)
                base_keys, base_rows = out.base.get(name, (keys[:0], rows[:0]))
                # rows are exported in insertion order: the copy's keys come first
                same = len(base_keys) <= len(keys) and (keys[: len(base_keys)] == base_keys).all()
                changed = changed_rows(base_rows, rows) if same else np.ones(len(keys), bool)
                self._send(out, name, "final", [keys[changed], rows[changed]])
            elif isinstance(t.shard, DenseShard) and self._owns(out, t.spec.ranges):
                self._send(out, name, "final", [t.shard.export()["rows"]])
        seqs = [[r, s] for r, s in sorted(self.state.last_seq.items())]
        out.end = self._send(out, None, "end", [], clock=out.target, seqs=seqs)
        log.info("%s: rebuild %d: final at clock %d sent", self.state.name, out.id, out.target)

    @staticmethod
    def _owns(out: Sending, ranges: Any) -> bool:
        """Whether a dense table (whole on one owner under replication) is ``out``'s to send."""
        return bool(ranges) and int(ranges[0][0]) in out.owners

    def tick(self) -> None:
        """Before the final: take it if the clocks are there already (e.g. every worker
        switched while waiting); after it: report once the end was answered."""
        out = self.out
        if out is None:
            return
        if not out.finished:
            target = self.due(self.state.clocks.min_clock)
            if target is not None:
                self.apply_sync(target)
                self.finish()
            return
        if out.end is None or not out.end.done():
            return
        err = out.end.exception(0)
        took = time.monotonic() - out.started
        stats = {"seconds": took, "bytes": out.bytes, "rows": out.rows,
                 "errors": [] if err is None else [str(err)]}  # fmt: skip
        self.tell({"kind": "move_done", "id": 0, "move": out.id, "source": self.state.rank,
                   "stats": stats, "purpose": PURPOSE})  # fmt: skip
        log.info("%s: rebuild %d sent in %.3fs (%d rows, %d bytes)%s", self.state.name, out.id,
                 took, out.rows, out.bytes, f": {err}" if err else "")  # fmt: skip
        self.out = None

    # ---- the server rebuilt -----------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether worker requests may have to wait (see :meth:`holds`)."""
        return self.incoming is not None or bool(self.held)

    def holds(self, h: dict[str, Any], since: float | None) -> bool:
        """Whether a worker's request waits: all of them do until the rebuild's end; after it,
        a new one (``since`` None) of a worker whose held requests were not handled yet, so
        that a worker's requests are handled in the order it sent them."""
        if "rank" not in h:
            return False
        inc, rank = self.incoming, h["rank"]
        if inc is not None:
            if h["kind"] == "switched" and h.get("purpose") == PURPOSE and h["move"] == inc.id:
                inc.switched.add(rank)
            if rank not in inc.switched:
                # sent for a rebuild that started over (a source died): the new one's final
                # holds it, and the worker must not wait on it (its switch waits for the step)
                raise Refusal(
                    "rebuilding",
                    f"{self.state.name} is rebuilt again (rebuild {inc.id}); worker[{rank}] has "
                    "not switched to it yet: this request is in the copy's rows, nothing changed",
                )
            self.held.add(rank)
            return True
        return since is None and rank in self.held

    def dropped(self) -> None:
        """A held request was turned down after the request timeout: this rebuild misses it,
        so its end is refused and the coordinator starts it over."""
        if self.incoming is not None:
            self.incoming.lost = True

    def unparked(self) -> None:
        """The loop handled every held request again: none waits for the rebuild any more."""
        if self.incoming is None:
            self.held.clear()

    def on_transfer(self, h: dict[str, Any], req: Request) -> None:
        inc, state = self.incoming, self.state
        source = int(h["source"])
        if inc is None or inc.id != h["move"] or source not in inc.sources:
            raise Refusal(
                "invalid",
                f"{state.name} expects no rebuild {h['move']} from server[{source}]",
            )
        if h["phase"] == "end" and inc.lost:
            raise Refusal(
                "moving",
                f"{state.name}: requests held for rebuild {inc.id} waited past the request "
                "timeout and were dropped: the rebuild is not whole and must start over",
            )
        if h["phase"] == "end":
            inc.clock = max(inc.clock, int(h.get("clock") or 0))
            seqs = {int(r): int(s) for r, s in h.get("seqs") or []}
            for owner in inc.sources.pop(source):
                inc.seqs[owner] = seqs
            if not inc.sources:
                self._complete(inc)
            req.reply.ok()
            return
        t = state.table(h.get("table") or "")
        if isinstance(t.shard, SparseShard) and len(req.arrays) == 2:
            t.shard.load(req.arrays[0], req.arrays[1])
        elif isinstance(t.shard, DenseShard) and len(req.arrays) == 1:
            t.shard.load(req.arrays[0])
            t.version += 1
        else:
            raise Refusal("invalid", f"rebuild of table {t.spec.name!r}: not held here so")
        req.reply.ok()

    def _complete(self, inc: Receiving) -> None:
        state = self.state
        clocks = state.clocks
        for r in range(len(clocks.clock)):
            clocks.clock[r] = max(clocks.clock[r], inc.clock)
        state.sync_floor = inc.clock
        state.rebuilt_seqs = (inc.ring, inc.seqs)
        state.rebuilding = False
        self.incoming = None
        log.info("%s: rebuild %d received (clock %d)", state.name, inc.id, inc.clock)
        self.progress()


def already_applied(
    state: ServerState, t: Table, rank: int, seq: int, keys: np.ndarray | None
) -> bool:
    """Whether an async push held during a rebuild is already in the rows its owner's source
    sent (its sequence number is at most the one the source had applied of that worker)."""
    got = state.rebuilt_seqs
    if got is None or t.sync is not None:
        return False
    ring, seqs = got
    if keys is not None and len(keys):
        owner = int(ring.route(keys[:1])[0])
    elif t.spec.ranges:
        owner = int(t.spec.ranges[0][0])
    else:
        return False
    return seq <= seqs.get(owner, {}).get(rank, -1)
