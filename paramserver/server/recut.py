"""Dense tables a move cuts anew: the server's side (server/transfer.py drives it).

A move's view names every dense table whose ranges change (``dense``: its new ranges; the
coordinator cuts a large table anew over the new servers, evenly as a new table would be cut,
and moves a small one whole when its server leaves: coordinator/registry.py ``replan``). The
elements that change server (``partition.dense_pieces``: ``(source, dest, lo, hi)``) move by the
steps of the sparse keys, on the same connection as them:

1. ``copy``, as the view comes: a source sends each destination its piece, the rows
   ``[w | optimizer state | scalars]`` of elements ``[lo, hi)``, and serves on from its old range.
2. ``final``, once every live worker switched at the source: the elements changed since the copy
   (compared bit for bit), as runs ``[lo, hi)``, and the parts of its buffered sync pushes that
   cover the piece (clock, worker, first element), in arrival order: the destination sums them
   with the pushes the switched workers sent it, element by element exactly as the old owner
   would have (``consistency.aggregate_dense`` of parts). The part of the new range this server
   held already is taken from its old range at this moment, with its buffered pushes.
3. ``end`` (server/transfer.py).

A server that holds a range of a table both before and after keeps two tables while the move goes
on: the old one (``state.tables``), which the workers that have not switched here still use (and
the pulls they left waiting keep), and the new one (``state.recut``), which the requests of those
that switched take (``ServerState.table(name, rank)``). A server with a new range only takes the
new table at once. Every table of new ranges is ``receiving`` until every source's end came: the
requests naming it wait (server/transfer.py ``holds``) and its buffered sync pushes are not
applied. After the move, once no pull sent by the old placement waits, the new table replaces
the old one; a server left without a range keeps the spec only.

With replication (a table lives whole on its owner and the next k - 1 servers of the ring) a
server holds what an owner holds: the pieces are ``partition.dense_copies`` (the old primary
sends to every new holder that lacked the elements); a server holding the same elements before
and after keeps its one table, which every worker's requests take (``Recut.keep``); the final
forwards only the buffered sync pushes that came before each worker's ``switched``
(``sync_parts``' ``before``: later ones reach the new holders from the worker itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserver.partition import dense_copies, holds
from paramserver.server.shard import DenseShard
from paramserver.server.state import ServerState
from paramserver.server.table import Table, make_table
from paramserver.spec import TableSpec
from paramserver.wire.refusal import Refusal

__all__ = ["DenseMoves", "element_runs", "run_positions"]

log = logging.getLogger(__name__)

# sends (dest, table, phase, extra header fields, arrays) as a ``transfer`` of the move
Send = Callable[[int, str, str, dict[str, Any], list[np.ndarray]], None]
# per switched worker, its buffered sync pushes per (table, clock) at its switch
Before = dict[int, dict[tuple[str, int], int]]


def element_runs(changed: np.ndarray, offset: int = 0) -> np.ndarray:
    """The runs ``[lo, hi)`` (int64, shape ``(k, 2)``) where ``changed`` is True, shifted by
    ``offset``.

    Example:
        element_runs(np.array([True, True, False, True]), 10)   # [[10, 12], [13, 14]]
    """
    d = np.diff(changed.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    runs = np.stack([np.flatnonzero(d == 1), np.flatnonzero(d == -1)], axis=1).astype(np.int64)
    runs += offset
    return runs


def run_positions(runs: np.ndarray) -> np.ndarray:
    """Every element of ``runs`` (``(k, 2)`` of ``[lo, hi)``), in order, without a loop.

    Example:
        run_positions(np.array([[10, 12], [13, 14]]))   # [10, 11, 13]
    """
    lens = runs[:, 1] - runs[:, 0]
    ends = np.cumsum(lens)
    at: np.ndarray = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    at += np.repeat(runs[:, 0] - (ends - lens), lens)
    return at


def sync_parts(
    t: Table, lo: int, hi: int, before: Before | None = None
) -> list[tuple[int, int, int, np.ndarray]]:
    """The buffered sync pushes of ``t`` over its elements ``[lo, hi)`` (positions in the
    table): ``(clock, worker, first element, values)`` in clock then arrival order; not those
    a worker sent after its switch (``before``: per switched worker, its buffered pushes per
    (table, clock) then; with replication this server may hold the table after the move too,
    and the worker sent those to the new holders itself)."""
    parts: list[tuple[int, int, int, np.ndarray]] = []
    if t.sync is None:
        return parts
    name = t.spec.name if before else ""  # (only a move with switched workers names it)
    for clock in sorted(t.sync.pending):
        seen: dict[int, int] = {}
        for item in t.sync.pending[clock]:
            rank, grad = item[0], item[1]
            seen[rank] = seen.get(rank, 0) + 1
            if before and rank in before and seen[rank] > before[rank].get((name, clock), 0):
                continue
            start = t.start + (item[2] if len(item) == 3 else 0)
            a, b = max(lo, start), min(hi, start + len(grad))
            if a < b:
                parts.append((clock, rank, a, grad[a - start : b - start]))
    return parts


@dataclass
class Recut:
    """One dense table of a move, as this server sees it."""

    old: Table  # the table as it was here (shard None: no old range here)
    new: Table | None  # the table of the new ranges here (None: none here)
    spec: TableSpec  # the spec after the move
    out: list[tuple[int, int, int]]  # (dest, lo, hi): the pieces this server sends
    local: tuple[int, int] | None  # the part of its new range this server held already
    base: list[np.ndarray] = field(default_factory=list)  # per piece: the rows of the copy
    # holds the same elements before and after (with replication: a copy that stays): the
    # old table serves everyone and keeps taking every push, only its spec changes
    keep: bool = False


class DenseMoves:
    """A server's dense tables in one move (see the module docstring).

    Example:
        moves = DenseMoves(state)
        moves.start({"w": [[0, 0, 500], [1, 500, 1000]]}, send)   # the view's ``dense``
        moves.finish(send)       # every live worker switched here
    """

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.tables: dict[str, Recut] = {}
        self.receiving: set[str] = set()  # the tables of new ranges whose elements come here
        self.rings: tuple[list[int], list[int]] = ([], [])  # the move's old and new ring

    def start(
        self, dense: dict[str, Any], send: Send | None, rings: tuple[list[int], list[int]]
    ) -> None:
        """A move's ``dense`` (``{name: new ranges}``) from ring ``rings[0]`` to ``rings[1]``
        (where the copies of a range go, with replication): make the tables of the new ranges
        here, and send each destination its pieces (``send`` None: this server sends none)."""
        state, me, k = self.state, self.state.rank, self.state.replication
        self.settle()
        self.rings = rings
        for name, raw in dense.items():
            t = state.tables.get(name)
            if t is None or t.spec.kind != "dense":
                continue
            spec = t.spec.with_ranges([(int(r), int(a), int(b)) for r, a, b in raw])
            old, ranges = t.spec.ranges, spec.ranges
            mine_old = [(a, b) for s, a, b in old if holds(me, s, rings[0], k)]
            mine_new = [(a, b) for s, a, b in ranges if holds(me, s, rings[1], k)]
            pieces = dense_copies(old, ranges, rings, k)
            out = [(d, lo, hi) for s, d, lo, hi in pieces if s == me]
            new: Table | None = None
            local = None
            if mine_old and mine_old == mine_new:
                t.other_ranges = ranges
                self._send_copies(Recut(t, None, spec, out, None, keep=True), send)
                continue
            if mine_new:
                new = make_table(spec, me, rings[1], k)
                new.max_bytes, new.other_ranges, new.receiving = t.max_bytes, old, True
                new.version = t.version + 1
                self.receiving.add(name)
                if mine_old:  # both: the workers that have not switched still name the old
                    state.recut[name] = new
                    a, b = max(mine_old[0][0], mine_new[0][0]), min(mine_old[0][1], mine_new[0][1])
                    local = (a, b) if a < b else None
                else:
                    state.tables[name] = new
            if mine_old:
                t.other_ranges = ranges
            elif new is None:  # neither: only the spec changes here
                t.spec, t.other_ranges = spec, old
            self._send_copies(Recut(t, new, spec, out, local), send)

    def _send_copies(self, recut: Recut, send: Send | None) -> None:
        """Keep ``recut``; send each destination its pieces' rows (the copy step)."""
        t = recut.old
        self.tables[t.spec.name] = recut
        if send is None or not recut.out:
            return
        assert isinstance(t.shard, DenseShard)
        for dest, lo, hi in recut.out:
            rows = t.shard.export(lo - t.start, hi - t.start)["rows"]
            recut.base.append(rows)
            send(dest, t.spec.name, "copy", {}, [np.array([[lo, hi]], np.int64), rows])

    def kept_by(self) -> dict[str, int]:
        """The tables received here whole from one source that holds them after the move too
        (with replication: it applied the async pushes of the workers that switched first
        before its final; server/copies.py): ``{name: source}``."""
        out: dict[str, int] = {}
        k = self.state.replication
        for name in self.receiving:
            r = self.tables.get(name)
            if r is None or len(r.old.spec.ranges) != 1 or len(r.spec.ranges) != 1:
                continue
            src, owner = r.old.spec.ranges[0][0], r.spec.ranges[0][0]
            if holds(src, owner, self.rings[1], k):
                out[name] = src
        return out

    def has_local(self) -> bool:
        """Whether this server takes a part of a new range from its own old range (at the
        final step): it is then one of the sources it waits for."""
        return any(r.local is not None for r in self.tables.values())

    def finish(self, send: Send, before: Before | None = None) -> None:
        """The final step of this server's pieces: changed elements and buffered pushes to
        each destination (not those sent after a worker's switch, ``before``: see
        :func:`sync_parts`), and the part it keeps into its table of the new ranges."""
        for name, r in self.tables.items():
            t = r.old
            if not isinstance(t.shard, DenseShard):
                continue
            for (dest, lo, hi), base in zip(r.out, r.base, strict=True):
                rows = t.shard.export(lo - t.start, hi - t.start)["rows"]
                changed = (base.view(_uint(base)) != rows.view(_uint(rows))).any(axis=1)
                arrays = [element_runs(changed, lo), np.ascontiguousarray(rows[changed])]
                extra: dict[str, Any] = {}
                parts = sync_parts(t, lo, hi, before)
                if parts:
                    extra["sync"] = [[c, w, len(g)] for c, w, _, g in parts]
                    arrays += [np.array([a for _, _, a, _ in parts], np.int64),
                               np.concatenate([g for _, _, _, g in parts])]  # fmt: skip
                send(dest, name, "final", extra, arrays)
            if r.local is not None and r.new is not None:
                lo, hi = r.local
                rows = t.shard.export(lo - t.start, hi - t.start)["rows"]
                self.load(r.new, np.array([[lo, hi]], np.int64), rows, sync_parts(t, lo, hi))
        self.state.switched = None

    def load(
        self,
        t: Table,
        runs: np.ndarray,
        rows: np.ndarray,
        parts: list[tuple[int, int, int, np.ndarray]],
    ) -> None:
        """Elements ``runs`` of the table of new ranges ``t`` become ``rows``, and the
        buffered pushes ``parts`` wait there for their clock."""
        assert isinstance(t.shard, DenseShard)
        at = run_positions(runs)
        if len(at) and (at.min() < t.start or at.max() >= t.stop):
            raise Refusal("invalid", f"transfer of dense table {t.spec.name!r}: elements "
                                     f"outside [{t.start}, {t.stop}) on {self.state.name}")  # fmt: skip
        t.shard.load_at(at - t.start, rows)
        if t.sync is not None:
            for clock, rank, start, grad in parts:
                if not t.start <= start <= start + len(grad) <= t.stop:
                    raise Refusal("invalid", f"transfer of dense table {t.spec.name!r}: a "
                                             "buffered push outside its range")  # fmt: skip
                t.sync.add(clock, (rank, grad.copy(), start - t.start))

    def receive(self, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        """A source's ``copy`` or ``final`` of dense table ``h["table"]``."""
        name = h.get("table") or ""
        t = self.state.recut.get(name) or self.state.tables.get(name)
        if name not in self.receiving or t is None or not isinstance(t.shard, DenseShard):
            raise Refusal("invalid", f"{self.state.name} receives no part of dense table "
                                     f"{name!r} in this move")  # fmt: skip
        if len(arrays) not in (2, 4) or arrays[0].ndim != 2 or arrays[0].shape[1:] != (2,):
            raise Refusal("invalid", f"transfer of dense table {name!r}: runs, rows[, starts, "
                                     "pushes] expected")  # fmt: skip
        runs = arrays[0].astype(np.int64)
        parts: list[tuple[int, int, int, np.ndarray]] = []
        sync = h.get("sync") or []
        if sync:
            if len(arrays) != 4 or len(arrays[2]) != len(sync):
                raise Refusal("invalid", f"transfer of dense table {name!r}: pushes unnamed")
            at = 0
            for (clock, rank, n), start in zip(sync, arrays[2].tolist(), strict=True):
                parts.append((int(clock), int(rank), int(start), arrays[3][at : at + n]))
                at += n
        self.load(t, runs, arrays[1], parts)

    def received(self) -> None:
        """Every source's end came: the tables of new ranges are whole (their buffered sync
        pushes may now be applied)."""
        for name in self.receiving:
            t = self.state.recut.get(name) or self.state.tables.get(name)
            if t is not None:
                t.receiving = False
        self.receiving = set()

    def settle(self) -> None:
        """After the move (no pull sent by the old placement waits): the table of the new
        ranges replaces the old one; a server left without a range keeps the spec only."""
        state = self.state
        for name, r in self.tables.items():
            if r.keep:
                r.old.spec, r.old.other_ranges = r.spec, ()
            elif r.new is not None:
                state.tables[name] = r.new
            elif r.old.shard is not None:
                state.tables[name] = Table(r.spec, None, other_ranges=r.old.spec.ranges)
        state.recut = {}
        self.tables = {}

    def abandon(self) -> None:
        """The move was abandoned (coordinator/scaling.py): every table back as it was before
        it (its old ranges, the old table), the tables of the new ranges dropped."""
        state = self.state
        for name, r in self.tables.items():
            t = r.old
            if t.shard is None and r.new is None:  # only its spec had changed here
                t.spec = t.spec.with_ranges(list(t.other_ranges))
            t.other_ranges = ()
            state.tables[name] = t
        state.recut = {}
        self.tables = {}
        self.receiving = set()

    def moving(self, name: str, rank: int) -> bool:
        """Whether a request of worker ``rank`` naming table ``name`` names elements still
        coming here (it waits for the move's end)."""
        return name in self.receiving and (
            name not in self.state.recut or self.state.takes_new(rank)
        )

    def sent(self) -> bool:
        """Whether this server sends dense pieces in this move."""
        return any(r.out for r in self.tables.values())


def _uint(a: np.ndarray) -> Any:
    return {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
