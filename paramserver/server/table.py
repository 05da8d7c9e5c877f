"""One table on one server: its spec, its shard, its counters, and the checks a request to it
passes before anything changes.

:class:`Table` is plain state; the request handlers (``pull.py``, ``push.py``, ``admin.py``)
call its checks, each of which raises :class:`~paramserver.wire.refusal.Refusal` (an error
reply) and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserver.arrays import all_finite, check_keys
from paramserver.partition import holds
from paramserver.server.consistency import SyncBuffer
from paramserver.server.keycache import KeyCache
from paramserver.server.shard import DenseShard, SparseShard
from paramserver.spec import TableSpec
from paramserver.wire.refusal import Refusal

__all__ = ["Table", "check_table_bytes", "keys_and_values", "make_table", "row_bytes"]


@dataclass
class Table:
    """A table's share on this server (``shard`` None: a dense table with no range here)."""

    spec: TableSpec
    shard: SparseShard | DenseShard | None
    start: int = 0  # dense: this server's range of the table
    stop: int = 0
    sync: SyncBuffer | None = None  # sync tables: pushes waiting for their clock
    pulls: int = 0
    pushes: int = 0
    skipped: int = 0  # gradient rows (sparse) or gradients (dense) skipped as non-finite
    version: int = 0  # dense: updates applied here (a worker's shared copy names one)
    keys: KeyCache = field(default_factory=KeyCache)  # sparse: cached key lists
    max_bytes: int | None = None  # the most bytes this table may take here (Limits)
    # dense: the placement on the other side of a move (before or after it), which a worker
    # that switched earlier or later than this server's view may still name
    other_ranges: tuple[tuple[int, int, int], ...] = ()
    # dense: a move brings elements of this table's range here (server/recut.py); its
    # buffered sync pushes wait until they all came
    receiving: bool = False

    def held(self, server: str) -> SparseShard | DenseShard:
        """The shard, or a refusal if this server holds no range of the (dense) table."""
        if self.shard is None:
            raise Refusal("invalid", f"{server} holds no range of dense table {self.spec.name!r}")
        return self.shard

    def pull_keys(self, arrays: list[np.ndarray], server: str) -> np.ndarray | None:
        """The keys of a pull without a signature (None for a dense table)."""
        name = self.spec.name
        if self.spec.kind == "dense":
            if arrays:
                raise Refusal("invalid", f"pull of dense table {name!r} takes no key array")
            self.held(server)
            return None
        if len(arrays) != 1:
            raise Refusal("invalid", f"pull of sparse table {name!r} needs exactly one key array")
        return check_keys(arrays[0], f"pull of {name!r}")

    def signed_rows(
        self, h: Any, arrays: list[np.ndarray], what: str, server: str
    ) -> tuple[np.ndarray, bool]:
        """Row ids for a request with a key-list signature: resolved from the keys the first
        time (which must be there), looked up later."""
        if not isinstance(self.shard, SparseShard):
            raise Refusal(
                "invalid", f"key signatures are for sparse tables, not {self.spec.name!r}"
            )
        if what == "pull" and not h["create"]:
            raise Refusal("invalid", "a pull with a key signature must create rows")
        want = 1 if what == "pull" else 2  # pull: [keys]; push: [keys, grads]
        if len(arrays) == want:
            keys = check_keys(arrays[0], f"{what} of {self.spec.name!r}")
            if what == "push":
                self.check_sparse_grads(h["rank"], len(keys), arrays[1], finite=False)
            self.check_room(keys, server)
            rows, dup = self.shard.resolve(keys)
            self.keys.put(h["rank"], h["sig"], rows, dup)
            return rows, dup
        if len(arrays) != want - 1:
            raise Refusal("invalid", f"{what} of {self.spec.name!r}: wrong number of arrays")
        found = self.keys.get(h["rank"], h["sig"])
        if found is None:
            raise Refusal(
                "unknown_sig",
                f"{server} does not know key list {h['sig']} of worker[{h['rank']}] for "
                f"table {self.spec.name!r}; send the keys again",
            )
        return found

    def check_sparse_grads(
        self, rank: int, n: int, grads: np.ndarray, *, finite: bool = True
    ) -> np.ndarray | None:
        """Check shape and dtype; returns None if every value is finite, else (policy "skip")
        the mask of the rows to keep."""
        where = f"push to table {self.spec.name!r} from worker[{rank}]"
        want = (n, self.spec.dim)
        if grads.shape != want or grads.dtype != self.spec.np_dtype:
            raise Refusal(
                "invalid",
                f"{where}: gradient must be {want} {self.spec.np_dtype}, "
                f"got {tuple(grads.shape)} {grads.dtype}",
            )
        return self.finite_rows(where, grads) if finite else None

    def finite_rows(self, where: str, grads: np.ndarray) -> np.ndarray | None:
        """None if every value is finite; else refuse (policy "reject") or return the mask of
        the rows to keep (policy "skip"), counting the rows skipped."""
        if all_finite(grads):
            return None
        if self.spec.nonfinite == "reject":
            raise Refusal(
                "non_finite",
                f"{where} rejected: the gradient contains NaN or Inf; the table is unchanged",
            )
        keep: np.ndarray = np.isfinite(grads).reshape(len(grads), -1).all(axis=1)
        self.skipped += int(len(keep) - keep.sum())
        return keep

    def check_room(self, keys: np.ndarray, server: str) -> None:
        """Refuse (changing nothing) a request that would grow a sparse table past max_rows,
        or past the bytes a table may take on a server (``Limits(table_bytes=...)``)."""
        if not isinstance(self.shard, SparseShard):
            return
        cap, what = self.spec.max_rows, "max_rows"
        if self.max_bytes is not None:
            by_bytes = self.max_bytes // max(1, row_bytes(self.spec))
            if cap is None or by_bytes < cap:
                cap, what = by_bytes, f"Limits(table_bytes={self.max_bytes}) allows"
        if cap is None:
            return
        have = self.shard.num_rows
        if have + len(keys) <= cap:
            return  # cheap: even if every key were new
        new = int(len(keys) - np.count_nonzero(self.shard.contains(np.unique(keys))))
        if have + new > cap:
            raise Refusal(
                "full",
                f"table {self.spec.name!r} is full on {server}: it holds {have} rows and "
                f"{what} is {cap}; a request for {new} new keys was refused and nothing "
                "changed (raise max_rows, add servers, or evict rows)",
            )


def row_bytes(spec: TableSpec) -> int:
    """The bytes of one row of a table and its optimizer state (one element of a dense one)."""
    opt = spec.optimizer
    width = spec.dim if spec.kind == "sparse" else 1
    return (width * (1 + opt.n_slots) + opt.n_scalars) * spec.np_dtype.itemsize


def keys_and_values(
    arrays: list[np.ndarray], where: str, values: str
) -> tuple[np.ndarray, np.ndarray]:
    """The two arrays of a write to a sparse table (keys checked, then ``values``: "row",
    "gradient"), or a refusal naming ``where``."""
    if len(arrays) != 2:
        raise Refusal("invalid", f"{where}: needs a key array and a {values} array")
    keys, vals = arrays
    check_keys(keys, where)
    return keys, vals


def check_table_bytes(spec: TableSpec, rank: int, limit: int, where: str) -> None:
    """Refuse a dense table whose range on server ``rank`` takes more than ``limit`` bytes."""
    if spec.kind != "dense":
        return
    for s, a, b in spec.ranges:
        need = (b - a) * row_bytes(spec)
        if (rank < 0 or s == rank) and need > limit:
            raise Refusal(
                "too_large",
                f"dense table {spec.name!r} would take {need} bytes on server[{s}] ({where}), "
                f"more than Limits(table_bytes={limit}): nothing was created (use more "
                "servers, a smaller table, or raise the limit)",
            )


def make_table(
    spec: TableSpec, rank: int, servers: int | Sequence[int] = 1, replication: int = 1
) -> Table:
    """An empty table for ``spec`` on server ``rank`` (a dense one holds its range only: the
    range it owns, or with ``replication`` the range of a rank it is a copy of)."""
    assert spec.seed is not None
    mode, _ = spec.mode
    table: Table
    if spec.kind == "sparse":
        table = Table(
            spec, SparseShard(spec.dim, spec.np_dtype, spec.init, spec.optimizer, spec.seed)
        )
    else:
        mine = [
            (s, a, b)
            for s, a, b in spec.ranges
            if s == rank or holds(rank, s, servers, replication)
        ]
        if mine:
            _, a, b = mine[0]
            shard = DenseShard(b - a, spec.np_dtype, spec.init, spec.optimizer, spec.seed, offset=a)
            table = Table(spec, shard, a, b)
        else:
            table = Table(spec, None)
    if mode == "sync":
        table.sync = SyncBuffer(spec.kind)
    return table
