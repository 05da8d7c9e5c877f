"""Ranges moving between servers while training goes on: the server's side of a move.

The primitive (general: a join and a drain use it, a replica rebuilt from a live one could):
*copy the keys of sparse table T that ring R' gives to server B, from server A to B, while A
serves on; then the delta; then switch the view.* In messages, all ``transfer`` requests from
A to B on one connection (so they arrive in order):

1. ``copy`` (per table): the rows ``[w | optimizer state | scalars]`` of every key A holds whose
   owner on R' is B (:meth:`Transfers.start`). A keeps serving them.
2. ``final`` (per table), once every live worker has switched to R' at A: the rows that changed
   since the copy (compared bit for bit, so -0.0 and NaN count as changes) and those created
   since, plus copies of A's buffered sync pushes of those keys ``[clock, worker, rows]`` in
   arrival order (B aggregates them exactly as A would have; A applies them too, for the pulls
   sent by the old ring that still wait on A).
3. ``end``: nothing more of this move comes from A. B's clocks need nothing from A: they
   move with each worker's own requests, which reach B from its switch on; sequence numbers
   neither (every push reaches exactly one of A and B, and a push to B after the switch has a
   larger number than any B has seen from that worker).

When is "every live worker switched"? A worker that sees a view with a ``move`` routes by the
new ring from the end of its step (its next ``clock()``, or at once while it waits at a
barrier) and says so: ``switched`` to the servers of both rings, on the connections its earlier
requests took, so after them. Once A has it from every live worker, nothing more will reach A
for the moving keys: the ``final`` step needs no pause on A. B, in turn, holds (parks) any
request for a key it is receiving, and every later request of that worker (they stay in
order), until every source's ``end`` came: it answers no pull and applies no push of those keys
before their rows are whole. The switches lie within one clock of each other: once a source has
a worker's ``switched``, it sends the move's view to every live worker that has not switched
(:meth:`Transfers.tell_late`), before any answer that waited on the switched worker's later
clocks, so a worker whose view from the coordinator is late has it before its step ends (a pull
at an old owner never needs a push already sent to a new one; a worker further ahead, after a
step with no request, has such a pull sent back: server/ahead.py). In sync mode the result is
bitwise the one of an undisturbed run:
the same rows, and every clock's pushes of a key aggregated in one place in (worker rank,
arrival) order. After the move A drops the rows that left (``drop_moved``), once no pull sent
by the old ring waits on A, so that a checkpoint holds every key once.

A source that has sent ``end`` to every destination tells the coordinator (``move_done``),
which switches the view once every source did (coordinator/scaling.py). Dense tables move by
the same steps, element ranges instead of keys (server/recut.py): the move's ``dense`` names
each table's new ranges (a large table cut anew over the new servers, a small one whole
elsewhere when its server leaves); a destination holds the requests naming such a table from
the workers that switched until the move's end, and a server holding a range before and after
serves the workers that have not switched from its old range meanwhile.

A move the coordinator abandons (a server of it died: coordinator/scaling.py) comes as a view
with the old ring and without that move (:meth:`Transfers.abandon`): a source keeps its rows and
sends nothing more, a destination drops what it received and serves its held requests as any
others, dense tables go back to their old ranges (``DenseMoves.abandon``); so a finished source
drops the moved rows only once a view switched to the new ring.

The same steps rebuild a replica from live copies (``purpose: "rebuild"``): server/rebuild.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserver.partition import HashRing, held_keys
from paramserver.server.ahead import send_back
from paramserver.server.copies import Moved
from paramserver.server.keycache import KeyCache
from paramserver.server.recut import DenseMoves
from paramserver.server.shard import SparseShard
from paramserver.server.state import ServerState
from paramserver.server.table import Table
from paramserver.wire.messages import TransferMsg
from paramserver.wire.paths import Request
from paramserver.wire.refusal import Refusal
from paramserver.wire.transport import Endpoint, Future, Security

__all__ = ["Transfers", "changed_rows", "moving_keys"]

log = logging.getLogger(__name__)


def moving_keys(keys: np.ndarray, ring: HashRing, me: int) -> np.ndarray:
    """Owner on ``ring`` of each key, or -1 where it is ``me`` (the keys that stay).

    Example:
        moving_keys(np.arange(4, dtype=np.uint64), HashRing.build([0, 1]), 0)
    """
    if len(keys) == 0:
        return np.empty(0, np.int32)
    owners = ring.route(keys).astype(np.int32)
    owners[owners == me] = -1
    return owners


def changed_rows(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Which rows of ``new`` differ from ``old`` bit for bit (``new`` may have more rows: those
    are new). Comparing bit patterns, a change from 0.0 to -0.0 or to NaN counts.

    Example:
        changed_rows(np.zeros((2, 1), np.float32), np.array([[0.0], [-0.0], [1.0]], np.float32))
    """
    width = new.dtype.itemsize
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    out = np.ones(len(new), bool)
    n = len(old)
    if n:
        out[:n] = (old.view(uint) != new[:n].view(uint)).any(axis=1)
    return out


@dataclass
class Outgoing:
    """A move as its source sees it."""

    move: int
    view: int  # the view number that announced it: a clock message at or past it = switched
    ring: HashRing  # the new ring
    old: HashRing  # the ring before: rows of keys it does not give to this server are stale
    dests: list[int]  # the other servers of the new ring
    base: dict[str, np.ndarray] = field(default_factory=dict)  # rows exported at the copy
    switched: set[int] = field(default_factory=set)
    first: dict[int, int] = field(default_factory=dict)  # worker -> its first new-ring clock
    finished: bool = False
    ends: list[Future[Any]] = field(default_factory=list)
    started: float = 0.0
    bytes: int = 0
    rows: int = 0
    announce: dict[str, Any] = field(default_factory=dict)  # the view that announced it
    told: set[int] = field(default_factory=set)  # workers sent that view by this server
    dense_bytes: int = 0  # of ``bytes``: the dense tables' rows and buffered pushes
    # per switched worker, its buffered sync pushes here when its ``switched`` came, per
    # (table, clock): with replication this server may hold a moving key on the new ring too,
    # and the pushes sent after the switch reach its new copies from the worker itself
    before: dict[int, dict[tuple[str, int], int]] = field(default_factory=dict)


@dataclass
class Incoming:
    """A move as a destination sees it."""

    move: int
    old: HashRing  # the ring before: keys it gives to another server are being received
    sources: set[int]
    # workers with a request held: their later requests wait too, so that they are handled
    # in the order they came (a clock message must not overtake the push held before it)
    held: set[int] = field(default_factory=set)
    ring: HashRing | None = None  # the new ring (with replication: see ``Moved``)
    seqs: dict[int, dict[int, int]] = field(default_factory=dict)  # source -> its last_seq


class Transfers:
    """A server's moves, as source and destination (see the module docstring).

    Example:
        transfers = Transfers(state, ctx, security, progress, tell_coordinator, timeout=30.0)
        transfers.on_view(view)           # a view with a ``move`` starts it
    """

    def __init__(
        self,
        state: ServerState,
        ctx: Any,
        security: Security | None,
        progress: Callable[[], None],
        tell: Callable[[dict[str, Any]], None],
        timeout: float,
    ) -> None:
        self.state = state
        self.progress = progress
        self.tell = tell  # a message to the coordinator
        self.endpoint = Endpoint(ctx, request_timeout=timeout, security=security)
        self.out: Outgoing | None = None
        self.incoming: Incoming | None = None
        self.seen: set[int] = set()  # moves started here
        self.received = 0  # moves whose every source's end came here
        # workers switched to a move not yet seen here (worker -> its first new-ring clock)
        self.early: dict[int, dict[int, int | None]] = {}
        # their buffered sync pushes then (Outgoing.before), per move
        self.early_before: dict[int, dict[int, dict[tuple[str, int], int]]] = {}
        self.ring: list[int] = []  # the servers of the ring this server serves under
        # after a move out: the ring whose keys this server keeps, once no old pull waits
        self.prune: HashRing | None = None
        # the move of ``prune`` and its servers: dropped once a view switched to them
        self.prune_to: tuple[int, list[int]] = (0, [])
        self.dense = DenseMoves(state)  # the dense tables a move re-cuts
        # sends worker ``rank`` a view, after every answer already sent to it (set by the loop)
        self.notify: Callable[[int, dict[str, Any]], None] | None = None

    # ---- views ----------------------------------------------------------------------------

    def on_view(self, view: dict[str, Any]) -> None:
        """Start the move a view announces (once), as source and as destination; give up one
        the view no longer has before it ended here (abandoned: a server of it died)."""
        ring = view.get("ring")
        move = view.get("move")
        if isinstance(ring, list):
            self.abandon(int(move["id"]) if isinstance(move, dict) else None, ring)
        if isinstance(ring, list) and self.incoming is None:
            self.ring = [int(r) for r in ring]
            self.drop_switched()
        if not isinstance(move, dict) or int(move["id"]) in self.seen:
            return
        self.seen.add(int(move["id"]))
        if self.prune is not None:  # before any row of this move arrives or leaves
            self.drop_moved(self.prune)
            self.prune = None
        old, new = [int(r) for r in move["from"]], [int(r) for r in move["to"]]
        me = self.state.rank
        for rank, address, status in view.get("servers", []):
            if rank != me and rank in new and status == "alive" and address:
                self.endpoint.connect(f"server[{rank}]", address)
        if me in new and set(old) - {me}:
            self.incoming = Incoming(int(move["id"]), HashRing.build(old), set(old) - {me},
                                     ring=HashRing.build(new))  # fmt: skip
            self.state.moved = None
        self.state.switched = None  # (a source: the workers switched here, below)
        if me in old:
            self.start(int(move["id"]), int(move["view"]), old, new)
            if self.out is not None and self.out.move == int(move["id"]):
                self.out.announce = view
                self.state.switched = self.out.switched
        dense = move.get("dense")
        if isinstance(dense, dict) and dense:
            out = self.out if me in old else None
            self.dense.start(dense, self.sender(out) if out is not None else None, (old, new))
        if self.dense.receiving:  # its own old range is one of the sources it waits for
            if self.incoming is None:
                self.incoming = Incoming(int(move["id"]), HashRing.build(old), set())
            if self.dense.has_local():
                self.incoming.sources.add(me)
        if me in old:
            self.tell_late()
            send_back(self.out, self.state, self.notify)  # early switches: server/ahead.py

    def abandon(self, live: int | None, ring: list[int]) -> None:
        """A view whose move (``live``: its id, or None) is not the one under way here: the
        coordinator abandoned that move (a server of it died). A source keeps every row and
        sends nothing more; a destination drops the rows it received (``ring``, the old one,
        does not give it those keys) and handles the requests it held as any other; dense
        tables go back to their old ranges; the rows a finished source would drop stay (the
        view did not switch to the new ring)."""
        out, inc = self.out, self.incoming
        if out is not None and out.move != live:
            log.warning("%s: move %d abandoned by the coordinator: keeping its rows",
                        self.state.name, out.move)  # fmt: skip
            self.out = None
        if inc is not None and inc.move != live:
            log.warning("%s: move %d abandoned by the coordinator: dropping the rows received",
                        self.state.name, inc.move)  # fmt: skip
            self.incoming = None
        if (out is not None and self.out is None) or (inc is not None and self.incoming is None):
            self.dense.abandon()
            self.state.switched = None
            self.drop_moved(HashRing.build([int(r) for r in ring]))
        moved, to = self.prune_to
        if self.prune is not None and moved != live and to != sorted(int(r) for r in ring):
            log.warning("%s: move %d abandoned after its end here: keeping its rows",
                        self.state.name, moved)  # fmt: skip
            self.prune = None
            self.dense.abandon()

    def start(self, move: int, view: int, old: list[int], new: list[int]) -> None:
        """Phase 1: send every destination the rows it gets, while serving on."""
        me = self.state.rank
        dests = [r for r in new if r != me]
        out = Outgoing(move, view, HashRing.build(new), HashRing.build(old), dests)
        out.started = time.monotonic()
        early = self.early.pop(move, {})
        out.switched = set(early)
        out.first = {r: c for r, c in early.items() if c is not None}
        out.before = self.early_before.pop(move, {})
        self.out = out
        for name, t in self.state.tables.items():
            if not isinstance(t.shard, SparseShard):
                continue
            rows = t.shard.export()
            out.base[name] = rows["rows"]
            self._send_rows(out, t, rows["keys"], rows["rows"], "copy", None)
        log.info("%s: move %d: copy sent to %s", self.state.name, move, out.dests)

    def on_switched(self, rank: int, move: int, since: int | None = None) -> None:
        """A worker's ``switched``: it routes by the new ring (from clock ``since`` on)."""
        out = self.out
        if out is not None and move == out.move:
            if rank not in out.switched:
                out.before[rank] = self._buffered(rank)
            out.switched.add(rank)
            if since is not None:
                out.first.setdefault(rank, since)
            self.tell_late()
            send_back(out, self.state, self.notify)  # pulls that ran ahead (server/ahead.py)
            if not out.finished and self.state.clocks.live <= out.switched:
                # now, not at the loop's next turn: the clock message behind this one (read in
                # the same batch) may complete a clock, and its buffered pushes of the moving
                # keys must go with the final step, not be applied here without the pushes
                # the switched workers sent to the new owner
                self.finish(out)
        elif move not in self.seen:  # before this server saw the view: kept for the move
            self.early.setdefault(move, {}).setdefault(rank, since)
            self.early_before.setdefault(move, {}).setdefault(rank, self._buffered(rank))

    def _buffered(self, rank: int) -> dict[tuple[str, int], int]:
        """How many buffered sync pushes of worker ``rank`` each (table, clock) holds now."""
        counts: dict[tuple[str, int], int] = {}
        for name, t in self.state.tables.items():
            for clock, items in (t.sync.pending if t.sync is not None else {}).items():
                n = sum(1 for item in items if item[0] == rank)
                if n:
                    counts[name, clock] = n
        return counts

    def tell_late(self) -> None:
        """Once some worker switched, send the move's view to every live worker that has not:
        before this server answers any request that waited for the switched worker's later
        clocks (they come after its ``switched``, on one connection), and on the connection
        of those answers, so that a worker whose view from the coordinator is late switches at
        the end of the step in which the first worker's new ring began, not later: every
        worker's switch lies within one clock of every other's."""
        out = self.out
        if out is None or not out.switched or not out.announce or self.notify is None:
            return
        for rank in sorted(self.state.clocks.live - out.switched - out.told):
            out.told.add(rank)
            self.notify(rank, out.announce)

    # ---- the loop's turn ------------------------------------------------------------------

    def tick(self) -> None:
        """Send the final step once every live worker switched; report the end once every
        destination has it."""
        self.endpoint.poll(0)
        self.drop_switched()
        out = self.out
        if out is None:
            return
        if not out.finished and self.state.clocks.live <= out.switched:
            self.finish(out)
        if out.finished and all(f.done() for f in out.ends):
            errors = [str(f.exception(0)) for f in out.ends if f.exception(0) is not None]
            if errors:
                log.error("%s: move %d failed: %s", self.state.name, out.move, errors[0])
            took = time.monotonic() - out.started
            stats = {"seconds": took, "bytes": out.bytes, "rows": out.rows, "errors": errors,
                     "dense_bytes": out.dense_bytes}  # fmt: skip
            self.tell({"kind": "move_done", "id": 0, "move": out.move,
                       "source": self.state.rank, "stats": stats})  # fmt: skip
            log.info("%s: move %d done in %.3fs (%d rows, %d bytes)",
                     self.state.name, out.move, took, out.rows, out.bytes)  # fmt: skip
            self.out = None
            self.prune = out.ring
            self.prune_to = (out.move, sorted(out.ring.servers))

    def drop_switched(self) -> None:
        """Drop the rows a finished move took away, once the view switched to its ring (not
        abandoned) and no pull sent by the old ring waits here."""
        if (self.prune is not None and self.out is None and not self.state.deferred.waiting
                and sorted(self.ring) == self.prune_to[1]):  # fmt: skip
            self.drop_moved(self.prune)
            self.prune = None

    def drop_moved(self, ring: HashRing) -> None:
        """Keep only the rows ``ring`` gives this server (the moved ones are stale here: a
        checkpoint must not hold them twice), in a new shard; cached key lists resolved to the
        old one are forgotten (a worker then sends its keys again)."""
        me, k = self.state.rank, self.state.replication
        self.dense.settle()  # dense tables: the new ranges' tables replace the old ones
        for t in self.state.tables.values():
            shard = t.shard
            if not isinstance(shard, SparseShard):
                continue
            rows = shard.export()
            keep = held_keys(rows["keys"], ring, me, k)
            if keep.all():
                continue
            fresh = SparseShard(shard.dim, shard.dtype, shard.init, shard.optimizer, shard.seed,
                                capacity=max(1024, int(keep.sum())))  # fmt: skip
            fresh.load(rows["keys"][keep], rows["rows"][keep])
            t.shard, t.keys = fresh, KeyCache()
            if t.sync is not None:  # the moved keys' pushes went with them
                for clock, items in t.sync.pending.items():
                    kept = []
                    for rank, keys, grads in items:  # one per push
                        stay = held_keys(keys, ring, me, k)
                        kept.append((rank, keys[stay], grads[stay]))
                    t.sync.pending[clock] = kept
            log.info("%s: table %r: %d moved rows dropped", self.state.name, t.spec.name,
                     int((~keep).sum()))  # fmt: skip

    def finish(self, out: Outgoing) -> None:
        """Phase 2: the rows changed since the copy, the buffered sync pushes, the end."""
        out.finished = True
        self.progress()  # apply what the clocks completed first
        for name, t in self.state.tables.items():
            if not isinstance(t.shard, SparseShard):
                continue
            rows = t.shard.export()
            base = out.base.get(name, rows["rows"][:0])
            changed = changed_rows(base, rows["rows"])
            self._send_rows(out, t, rows["keys"][changed], rows["rows"][changed], "final",
                            self._take_sync(out, t))  # fmt: skip
        self.dense.finish(self.sender(out), out.before)
        state = self.state
        # the last push of each worker in the rows just sent (async: see ``Moved``)
        seqs = [[w, s] for w, s in sorted(state.last_seq.items())]
        if self.incoming is not None and state.rank in self.incoming.sources:
            self.ended(state.rank)  # the part of its new ranges it held: taken just now
        for dest in out.dests:
            out.ends.append(
                self.endpoint.request(
                    f"server[{dest}]",
                    {"kind": "transfer", "move": out.move, "source": state.rank, "phase": "end",
                     "view": out.view, "seqs": seqs},
                    what=f"end of move {out.move} from {state.name} to server[{dest}]",
                )
            )  # fmt: skip

    def _take_sync(self, out: Outgoing, t: Table) -> dict[int, list[tuple[int, int, Any, Any]]]:
        """The buffered sync pushes of moving keys in ``t``'s buffer: per destination,
        ``(clock, worker, keys, grads)`` runs in arrival order. They stay in the buffer here
        too: a pull sent by the old ring may still wait here for their clock, and must see
        them applied (these rows are not this server's any more, so nothing reads them after)."""
        moved: dict[int, list[tuple[int, int, Any, Any]]] = {}
        if t.sync is None:
            return moved
        name = t.spec.name
        for clock, items in t.sync.pending.items():
            seen: dict[int, int] = {}
            for rank, keys, grads in items:  # one per push, not per key
                seen[rank] = seen.get(rank, 0) + 1
                if rank in out.before and seen[rank] > out.before[rank].get((name, clock), 0):
                    continue  # sent after its switch: its new copies have it from the worker
                for dest in out.dests:
                    sel = self.gets(out, keys, dest)
                    if sel.any():
                        moved.setdefault(dest, []).append((clock, rank, keys[sel], grads[sel]))
        return moved

    def gets(self, out: Outgoing, keys: np.ndarray, dest: int) -> np.ndarray:
        """Which of ``keys`` this server sends ``dest`` in move ``out`` (bool per key): those
        it owns on the old ring (their primary: with replication, one copy sends) that ``dest``
        holds on the new ring and did not on the old one. Rows left behind by an earlier move
        are not this server's to send."""
        k, me = self.state.replication, self.state.rank
        if len(keys) == 0:
            return np.zeros(0, bool)
        sel = out.old.route(keys) == me
        sel &= held_keys(keys, out.ring, dest, k) & ~held_keys(keys, out.old, dest, k)
        return np.asarray(sel, bool)

    def sender(self, out: Outgoing) -> Any:
        """How :class:`DenseMoves` sends a destination a part of a dense table in move ``out``
        (on the connection of the keys' rows, so in order with them and the end)."""
        me = self.state.rank

        def send(dest: int, table: str, phase: str, extra: dict[str, Any],
                 arrays: list[np.ndarray]) -> None:  # fmt: skip
            header = {"kind": "transfer", "move": out.move, "phase": phase, "source": me,
                      "table": table, "view": out.view, **extra}  # fmt: skip
            nbytes = sum(a.nbytes for a in arrays)
            out.rows += len(arrays[1])
            out.bytes += nbytes
            out.dense_bytes += nbytes
            what = f"{phase} of dense table {table!r} to server[{dest}]"
            self.endpoint.request(f"server[{dest}]", header, arrays, what=what)

        return send

    def _send_rows(
        self,
        out: Outgoing,
        t: Table,
        keys: np.ndarray,
        rows: np.ndarray,
        phase: str,
        sync: dict[int, list[tuple[int, int, Any, Any]]] | None,
    ) -> None:
        for dest in out.dests:
            sel = self.gets(out, keys, dest)
            # with the view of the move: a destination that has not seen it yet asks the
            # coordinator before it takes the rows (server/cluster.py, admit)
            header: dict[str, Any] = {"kind": "transfer", "move": out.move, "phase": phase,
                                      "source": self.state.rank, "table": t.spec.name,
                                      "view": out.view}  # fmt: skip
            arrays = [np.ascontiguousarray(keys[sel]), np.ascontiguousarray(rows[sel])]
            runs = (sync or {}).get(dest, [])
            if runs:
                header["sync"] = [[c, r, len(k)] for c, r, k, _ in runs]
                arrays += [np.concatenate([k for _, _, k, _ in runs]),
                           np.concatenate([g for _, _, _, g in runs])]  # fmt: skip
            out.rows += len(arrays[0])
            out.bytes += sum(a.nbytes for a in arrays)
            # answered in order on one connection: only the end's answer is waited for
            self.endpoint.request(
                f"server[{dest}]", header, arrays, what=f"{phase} of table {t.spec.name!r}"
            )

    # ---- the destination ------------------------------------------------------------------

    def holds(self, h: dict[str, Any], arrays: list[np.ndarray]) -> bool:
        """Whether a request must wait for the move's end: a pull or push of a sparse table
        naming a key this server is receiving, and every later request of its worker."""
        inc = self.incoming
        if inc is None:
            return False
        if h.get("rank") in inc.held:
            return True
        if self.dense.receiving and h["kind"] in ("pull", "push", "pull_many", "push_many",
                                                  "assign"):  # fmt: skip
            names = h.get("tables") or [] if h["kind"].endswith("_many") else [h.get("table")]
            if any(isinstance(n, str) and self.dense.moving(n, h["rank"]) for n in names):
                inc.held.add(h["rank"])
                return True
        if h["kind"] not in ("pull", "push"):
            return False
        t = self.state.tables.get(h.get("table", ""))
        if t is None or not isinstance(t.shard, SparseShard):
            return False
        if not arrays:
            return False  # a signature resolved before the move: keys this server held
        if not held_keys(arrays[0], inc.old, self.state.rank, self.state.replication).all():
            inc.held.add(h["rank"])
            return True
        return False

    def on_transfer(self, h: TransferMsg, req: Request) -> None:
        inc, state = self.incoming, self.state
        if inc is None or inc.move != h["move"] or h["source"] not in inc.sources:
            raise Refusal(
                "invalid",
                f"{state.name} expects no transfer of move {h['move']} from server[{h['source']}]",
            )
        if h["phase"] == "end":
            # the source's clocks are not taken: a worker's clock here moves only with its own
            # requests, in their order (a held push must not find its clock already applied);
            # every worker's switching clock message comes here before the last source ends
            inc.seqs[h["source"]] = {int(w): int(s) for w, s in h.get("seqs") or []}
            self.ended(h["source"])
            req.reply.ok()
            return
        if h.get("table") in self.dense.receiving:
            self.dense.receive(dict(h), req.arrays)
            req.reply.ok()
            return
        t = state.table(h.get("table") or "")
        if not isinstance(t.shard, SparseShard) or len(req.arrays) not in (2, 4):
            raise Refusal("invalid", f"transfer of table {t.spec.name!r}: not a sparse table here")
        keys, rows = req.arrays[0], req.arrays[1]
        t.shard.load(keys, rows)
        runs = h.get("sync") or []
        if runs and t.sync is not None:
            skeys, sgrads = req.arrays[2], req.arrays[3]
            at = 0
            for clock, rank, n in runs:  # one per buffered push
                t.sync.add(int(clock), (int(rank), skeys[at : at + n].copy(),
                                        sgrads[at : at + n].copy()))  # fmt: skip
                at += n
        req.reply.ok()

    def ended(self, source: int) -> None:
        """Nothing more of this move comes from ``source`` (itself: the part of its new dense
        ranges it held); once from none, the held requests go on."""
        inc = self.incoming
        assert inc is not None
        inc.sources.discard(source)
        if not inc.sources:
            log.info("%s: move %d received", self.state.name, inc.move)
            if self.state.replication > 1 and inc.ring is not None:
                self.state.moved = Moved(inc.old, inc.ring, self.state.replication, inc.seqs,
                                         self.dense.kept_by())  # fmt: skip
            self.dense.received()
            self.incoming = None
            self.received += 1
        self.progress()

    def close(self) -> None:
        self.endpoint.close()
