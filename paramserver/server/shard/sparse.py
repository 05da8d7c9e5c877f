"""A server's share of a sparse table: :class:`SparseShard`, keyed rows created on first touch.

The shard owns the storage and applies the optimizer; it knows nothing of sockets, clocks or
consistency (the handlers decide *when* to call :meth:`~SparseShard.push`). Every method
validates its arguments before touching state, so a bad request raises
:class:`~paramserver.errors.ConfigError` and leaves the shard as it was. The work itself
happens in the compiled kernels of :mod:`paramserver.server.kernels`.
Example:
    >>> import numpy as np
    >>> from paramserver.init import Normal
    >>> from paramserver.optim import Adagrad
    >>> shard = SparseShard(dim=4, dtype="float32", init=Normal(std=0.01),
    ...                     optimizer=Adagrad(lr=0.1), seed=7)
    >>> keys = np.array([7, 42, 7], dtype=np.uint64)
    >>> shard.pull(keys).shape
    (3, 4)
    >>> shard.push(keys, np.ones((3, 4), np.float32))
    >>> shard.num_rows
    2
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from paramserver.arrays import check_keys
from paramserver.errors import ConfigError
from paramserver.init import Initializer
from paramserver.optim import Optimizer
from paramserver.parallel import halves, two_cores
from paramserver.server import kernels as k
from paramserver.server.shard.arena import Arena
from paramserver.server.shard.rule import (
    Shard,
    check_int,
    check_out,
    check_values,
    init_args,
)

__all__ = ["SparseShard"]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


SPLIT_ROWS_BYTES = 1 << 21
"""Bytes of rows from which a gather or an update runs as two halves on two threads
(:func:`paramserver.parallel.halves`): rows at random places wait on memory, and a worker
waiting for the reply leaves the other core free. A hand-off to the helper thread
(:func:`~paramserver.parallel.both`) takes 70-90 us on the 2-core VM the benchmarks run on, so
a half must take longer than that: at 1 MiB, the Zipf steps of dim 16 (29k rows of 64 bytes) split
gathers and updates of 0.3-0.45 ms and were slower for it."""

SPLIT_INIT_BYTES = 1 << 20
"""Bytes of new rows from which their initialization runs as two halves (a Normal initial
value costs more per byte than a gather)."""

SPLIT_KEYS_BYTES = 1 << 17
"""Bytes of keys (16,384) from which their lookups run as two halves on two threads, when
most keys are found (see :meth:`SparseShard._find_or_create`)."""

SPLIT_MISSING = 4
"""Lookups are split only when the previous request missed at most 1 in this many keys: split
lookups insert the missing keys in a second pass that probes for them again (the Zipf steps,
with 55% new keys, were slower split)."""

_AHEAD_MIN_BYTES = 1 << 20
"""Bytes of rows whose pages :meth:`SparseShard.prepare` has mapped ahead at least."""

_PULLED_KEYS = 1 << 20
"""Keys of a pull whose rows a shard keeps for the push of the same keys (16 MiB at most)."""

_NO_KEYS = np.empty(0, np.uint64)
"""``kept`` for :func:`~paramserver.server.kernels.lookup`: no copy of the keys."""

_BUCKET_ROWS = 4
"""Rows an index holds per bucket before it doubles: 80% of the cells, so that a lookup
rarely reads past its own bucket (one cache line)."""


class SparseShard(Shard):
    """Rows of width ``dim`` keyed by uint64, created on first touch, updated by an optimizer.

    Storage: one growable arena of rows ``[w | optimizer state | per-row scalars]``
    (doubling when full, without copying: :class:`~paramserver.server.shard.arena.Arena`), an open-addressing hash index of 64-byte buckets of 5
    keys and their uint32 row ids (at most 4 rows a bucket on average, doubling by
    rehash) that is also the only record of the rows' keys, and a byte per row for
    duplicate detection. At most ``2**32 - 1`` rows. Initial rows depend only on
    (seed, key).

    Example:
        >>> from paramserver.init import Zeros
        >>> from paramserver.optim import SGD
        >>> shard = SparseShard(2, "float32", Zeros(), SGD(lr=1.0), seed=0)
        >>> keys = np.array([3, 3], np.uint64)
        >>> shard.push(keys, np.ones((2, 2), np.float32))  # summed: one update of -2
        >>> shard.pull(np.array([3], np.uint64)).tolist()
        [[-2.0, -2.0]]
    """

    def __init__(
        self,
        dim: int,
        dtype: npt.DTypeLike,
        init: Initializer,
        optimizer: Optimizer,
        seed: int,
        capacity: int = 1024,
    ) -> None:
        self.dim = check_int("dim", dim, 1)
        super().__init__(dtype, init, optimizer, seed)
        self._init_args = init_args(init)
        capacity = check_int("capacity", capacity, 1)
        self.stride = self.dim * (1 + optimizer.n_slots) + optimizer.n_scalars
        self._arena = Arena(self.stride, self.dtype, capacity)
        self._data = self._arena.rows
        self._mark = np.zeros(capacity, np.uint8)
        self._index = k.new_index(_pow2_at_least(-(-capacity // _BUCKET_ROWS)))
        self._n = 0
        self._stamp = 0
        self._recent_keys = 0  # keys of the latest request that may create rows (prepare)
        self._recent_new = 0  # rows it created
        # the keys of the latest pull that created rows, and their rows (a row keeps its id)
        self._pulled: tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]] | None = None
        self._kept = _NO_KEYS  # the buffer its keys are in (_keep_buffer)

    # ------------------------------------------------------------------ properties

    @property
    def num_rows(self) -> int:
        """How many rows are stored."""
        return self._n

    @property
    def capacity(self) -> int:
        """Rows the arena holds before it doubles."""
        return int(self._data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes allocated: arena, duplicate marks and hash index."""
        return int(self._data.nbytes + self._mark.nbytes + self._index.nbytes)

    # ------------------------------------------------------------------ public operations

    def pull(
        self,
        keys: npt.NDArray[np.uint64],
        *,
        create: bool = True,
        out: npt.NDArray[Any] | None = None,
    ) -> npt.NDArray[Any]:
        """Return the weights of ``keys`` as ``(len(keys), dim)``; keys may repeat.

        Missing rows are created by the initializer (``create=True``), or only
        computed, not stored (``create=False``). ``out`` receives the rows if given.

        Example:
            >>> from paramserver.init import Constant
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(2, "float64", Constant(0.5), SGD(), seed=1)
            >>> shard.pull(np.array([9], np.uint64), create=False).tolist(), shard.num_rows
            ([[0.5, 0.5]], 0)
        """
        keys = check_keys(keys, "shard")
        res = check_out(out, (keys.shape[0], self.dim), self.dtype)
        if create:
            self._pulled = None  # (the buffer of its keys is written again now)
            kept = self._keep_buffer(keys.shape[0])
            # new rows' weights written to res as they are made, the others gathered
            rows = self._find_or_create(keys, out=res, kept=kept)
            # the push that follows a pull (a training step) is for the same keys, usually;
            # kept for lists up to _PULLED_KEYS keys only (the keys' buffer stays with the shard)
            if kept is not None:
                self._pulled = (kept, rows)
        else:
            rows = np.empty(keys.shape[0], np.int64)
            k.lookup(self._index, keys, rows, _NO_KEYS)
            kind, p0, p1 = self._init_args
            data, seed = self._data, self._seed
            halves(
                lambda o, r, ks: k.gather_or_init(data, r, ks, o, seed, kind, p0, p1),
                [res, rows, keys],
                split_at=SPLIT_ROWS_BYTES,
            )
        return res

    def _gather(self, rows: npt.NDArray[np.int64], out: npt.NDArray[Any]) -> None:
        """``out[i]`` = the weights of ``rows[i]``."""
        data = self._data
        halves(lambda o, r: k.gather(data, r, o), [out, rows], split_at=SPLIT_ROWS_BYTES)

    def _update(self, rows: npt.NDArray[np.int64], grads: npt.NDArray[Any]) -> None:
        # rows distinct (repeated keys summed first): the halves touch different rows
        data, rule = self._data, self._rule
        halves(lambda g, r: rule.apply(data, r, g), [grads, rows], split_at=SPLIT_ROWS_BYTES)

    def push(self, keys: npt.NDArray[np.uint64], grads: npt.NDArray[Any]) -> None:
        """Apply gradients ``grads`` ``(len(keys), dim)``: duplicates summed in order, then
        one optimizer update per distinct key; missing rows are created first.

        NaN and inf are not checked here (the caller decides, see :func:`paramserver.arrays.all_finite`).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Zeros(), SGD(lr=0.5), seed=0)
            >>> shard.push(np.array([1], np.uint64), np.array([[2.0]], np.float32))
            >>> shard.pull(np.array([1], np.uint64)).tolist()
            [[-1.0]]
        """
        keys = check_keys(keys, "shard")
        grads = check_values("grads", grads, (keys.shape[0], self.dim), self.dtype)
        if keys.shape[0] == 0:
            return
        pulled = self._pulled
        if pulled is not None and pulled[0].shape == keys.shape and np.array_equal(pulled[0], keys):
            rows = pulled[1]  # the keys of the latest pull: their rows, no lookup (ids stay)
        else:
            rows = self._find_or_create(keys)
        if k.has_duplicates(rows, self._mark, self._next_stamp()):
            rows, grads = k.sum_duplicates(rows, grads)
        self._update(rows, grads)

    def resolve(self, keys: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.int64], bool]:
        """Row ids of ``keys`` (rows created as a pull would), and whether any repeats: what a
        server keeps for a cached key list, so later requests skip the hash lookup.

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Zeros(), SGD(), seed=0)
            >>> rows, dup = shard.resolve(np.array([4, 9], np.uint64))
            >>> rows.tolist(), dup
            ([0, 1], False)
        """
        keys = check_keys(keys, "shard")
        rows = self._find_or_create(keys)
        return rows, bool(k.has_duplicates(rows, self._mark, self._next_stamp()))

    def pull_rows(
        self, rows: npt.NDArray[np.int64], out: npt.NDArray[Any] | None = None
    ) -> npt.NDArray[Any]:
        """Weights of rows given by :meth:`resolve` (no lookup).

        Example:
            >>> from paramserver.init import Constant
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Constant(2.0), SGD(), seed=0)
            >>> rows, _ = shard.resolve(np.array([4], np.uint64))
            >>> shard.pull_rows(rows).tolist()
            [[2.0]]
        """
        res = check_out(out, (rows.shape[0], self.dim), self.dtype)
        self._gather(rows, res)
        return res

    def push_rows(
        self, rows: npt.NDArray[np.int64], grads: npt.NDArray[Any], duplicates: bool
    ) -> None:
        """:meth:`push` to rows given by :meth:`resolve` (no lookup).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Zeros(), SGD(lr=1.0), seed=0)
            >>> rows, dup = shard.resolve(np.array([4], np.uint64))
            >>> shard.push_rows(rows, np.ones((1, 1), np.float32), dup)
            >>> shard.pull_rows(rows).tolist()
            [[-1.0]]
        """
        grads = check_values("grads", grads, (rows.shape[0], self.dim), self.dtype)
        if duplicates:
            rows, grads = k.sum_duplicates(rows, grads)
        self._update(rows, grads)

    def contains(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """Which of ``keys`` have a stored row.

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Zeros(), SGD(), seed=0)
            >>> _ = shard.pull(np.array([5], np.uint64))
            >>> shard.contains(np.array([5, 6], np.uint64)).tolist()
            [True, False]
        """
        keys = check_keys(keys, "shard")
        rows = np.empty(keys.shape[0], np.int64)
        k.lookup(self._index, keys, rows, _NO_KEYS)
        return rows >= 0

    def export(self) -> dict[str, npt.NDArray[Any]]:
        """Copies of all rows in insertion order: ``keys`` (n,) uint64 and ``rows`` (n, stride),
        each row ``[w | optimizer state | scalars]``.

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import Adagrad
            >>> shard = SparseShard(2, "float32", Zeros(), Adagrad(), seed=0)
            >>> _ = shard.pull(np.array([8], np.uint64))
            >>> shard.export()["rows"].shape
            (1, 4)
        """
        keys = np.empty(self._n, np.uint64)
        k.keys_by_row(self._index, keys)
        return {"keys": keys, "rows": self._data[: self._n].copy()}

    def load(self, keys: npt.NDArray[np.uint64], rows: npt.NDArray[Any]) -> None:
        """Store full rows (as :meth:`export` gives them) under ``keys``, replacing existing ones.

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> a = SparseShard(2, "float32", Zeros(), SGD(), seed=0)
            >>> a.push(np.array([4], np.uint64), np.ones((1, 2), np.float32))
            >>> b = SparseShard(2, "float32", Zeros(), SGD(), seed=0)
            >>> b.load(**a.export())
            >>> b.pull(np.array([4], np.uint64)).tolist()
            [[-0.009999999776482582, -0.009999999776482582]]
        """
        keys = check_keys(keys, "shard")
        rows = check_values("rows", rows, (keys.shape[0], self.stride), self.dtype)
        if keys.shape[0] == 0:
            return
        ids = self._find_or_create(keys, initialize=False)
        k.scatter_rows(self._data, ids, rows)

    def assign(self, keys: npt.NDArray[np.uint64], values: npt.NDArray[Any]) -> None:
        """Set the rows of ``keys`` (creating missing ones): ``values`` ``(len(keys), dim)``
        sets the weights and resets the optimizer state to a new row's; ``(len(keys), stride)``
        sets whole rows, state included (as :meth:`export` gives them). A repeated key keeps
        its last row. Nothing is checked for NaN or inf here (the caller decides).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import Adagrad
            >>> shard = SparseShard(2, "float32", Zeros(), Adagrad(initial_accumulator=0.1), seed=0)
            >>> shard.push(np.array([4], np.uint64), np.ones((1, 2), np.float32))
            >>> shard.assign(np.array([4, 9], np.uint64), np.full((2, 2), 3.0, np.float32))
            >>> shard.export()["rows"].tolist()
            [[3.0, 3.0, 0.10000000149011612, 0.10000000149011612], [3.0, 3.0, 0.10000000149011612, 0.10000000149011612]]
        """
        keys = check_keys(keys, "shard")
        n = keys.shape[0]
        whole = (
            isinstance(values, np.ndarray) and values.ndim == 2 and values.shape[1] == self.stride
        )
        if whole:
            self.load(keys, values)
            return
        values = check_values("values", values, (n, self.dim), self.dtype)
        if n == 0:
            return
        ids = self._find_or_create(keys, initialize=False)
        k.assign_rows(self._data, ids, values, *self._rule.state)

    # ------------------------------------------------------------------ storage

    def prepare(self) -> None:
        """Room for the next requests' new rows, made between requests (a server calls it
        once its reply went out, while the worker works on the rows): room for a third more
        rows and for twice the keys of the latest request (at most twice the rows stored).
        The hash index is doubled (a rehash of every key: 20-30 ms at 2**19 rows, a stall
        inside the request that filled it), the arena's view made longer where that copies
        nothing, and its next pages mapped by a background thread (:meth:`Arena.ready_soon`):
        the latest request's keys, at most a quarter of the rows stored. A request that
        creates rows then rarely waits for any of these; it still does what is missing.

        Example:
            shard.pull(keys); reply(...); shard.prepare()
        """
        n, recent = self._n, self._recent_keys
        # twice the latest keys, but not past twice the rows stored: the index is resident
        # memory (its rehash touches every page), and a next request that size still fits
        need = n + max(n // 3, min(2 * recent, n))
        buckets = self._index.shape[0]
        if _BUCKET_ROWS * buckets < need:
            while _BUCKET_ROWS * buckets < need:
                buckets *= 2
            self._grow_index(buckets)
        if self._arena.reserved and self.capacity < need:
            self._grow_arena(need)
        # pages mapped ahead are resident memory whether rows come or not: at most a quarter
        # of the rows stored (and 1 MiB), so a server at rest holds about what its rows need
        row_bytes = self.stride * self.dtype.itemsize
        ahead = max(min(recent, n // 4), _AHEAD_MIN_BYTES // row_bytes)
        self._arena.ready_soon(min(n + ahead, self.capacity))

    def _keep_buffer(self, n: int) -> npt.NDArray[np.uint64] | None:
        """Where a pull's ``n`` keys are kept for the push of the same keys (None past
        :data:`_PULLED_KEYS`): the first ``n`` of a buffer reused from pull to pull, its pages
        mapped once. With ``keys.copy()`` into fresh memory instead, the server's part of a
        100k-key fresh pull took 0.2-0.25 ms longer (docs/performance.md, "Fewer hand-offs")."""
        if n > _PULLED_KEYS:
            return None
        if self._kept.shape[0] < n:
            self._kept = np.empty(min(_PULLED_KEYS, max(n, 2 * self._kept.shape[0])), np.uint64)
        return self._kept[:n]

    def _next_stamp(self) -> int:
        """A stamp for :func:`~paramserver.server.kernels.has_duplicates`: 1..255, the marks
        cleared when it wraps (one memset of a byte a row every 255 calls)."""
        if self._stamp == 255:
            self._mark.fill(0)
            self._stamp = 0
        self._stamp += 1
        return self._stamp

    def _find_or_create(
        self,
        keys: npt.NDArray[np.uint64],
        *,
        initialize: bool = True,
        out: npt.NDArray[Any] | None = None,
        kept: npt.NDArray[np.uint64] | None = None,
    ) -> npt.NDArray[np.int64]:
        """Row ids of ``keys``, appending (and initializing) rows for the missing ones; with
        ``out``, the weights of every row of ``keys`` written to ``out[i]`` (a new row's as it
        is made, the others gathered in the same pass); with ``kept`` (as long as ``keys``), a
        copy of the keys written there."""
        if self._n + keys.shape[0] > k.INDEX_MAX_ROWS:
            new = int(np.count_nonzero(~self.contains(np.unique(keys))))
            if self._n + new > k.INDEX_MAX_ROWS:
                raise ConfigError(
                    f"keys: {new} new rows would take this shard past the "
                    f"{k.INDEX_MAX_ROWS} rows it can hold (it has {self._n}); nothing was "
                    "changed (spread the table over more servers)"
                )
        rows = np.empty(keys.shape[0], np.int64)
        n0 = self._n
        # the previous request's share of new keys predicts this one's (a training step's
        # batch after the last): split lookups probe the missing keys twice
        mostly_found = self._recent_new * SPLIT_MISSING <= self._recent_keys
        self._recent_keys = keys.shape[0]
        if keys.nbytes >= SPLIT_KEYS_BYTES and mostly_found and two_cores():
            # read-only lookups in two halves at once; then the missing keys inserted in one
            # pass, in list order, so new rows get the ids a single pass gives them
            index, data = self._index, self._data
            into = _NO_KEYS if kept is None else kept
            to = out if out is not None else np.empty((keys.shape[0], 0), self.dtype)

            def look(ks: npt.NDArray[np.uint64], r: npt.NDArray[np.int64], kp: Any, o: Any) -> int:
                miss = int(k.lookup(index, ks, r, kp))
                if miss == 0 and o.shape[1]:  # its rows gathered at once: one hand-off
                    k.gather(data, r, o)
                return miss

            missing = halves(look, [keys, rows, into, to], split_at=0)
            if sum(missing) == 0:
                self._recent_new = 0
                return rows
            # (a half that found every key gathered its rows already; the pass below writes
            # them again, the same values: only when the previous request misled the split)
            where = np.flatnonzero(rows < 0)
            sub = self._insert(keys[where])
            rows[where] = sub
        else:
            self._insert(keys, rows)
            if kept is not None:
                kept[:] = keys
        self._recent_new = self._n - n0
        if initialize and self._n > n0:
            kind, p0, p1 = self._init_args
            data, dim, seed, state = self._data, self.dim, self._seed, self._rule.state
            to = np.empty((0, dim), self.dtype) if out is None else out

            def init(ks: npt.NDArray[np.uint64], r: npt.NDArray[np.int64], o: Any) -> None:
                k.init_rows(data, ks, r, n0, dim, seed, kind, p0, p1, *state, o)
                if o.shape[0]:  # the rows that existed: one hand-off to the helper for both
                    k.gather_below(data, r, o, n0)

            # a repeated new key may be initialized by both halves at once: each writes its
            # row once, with the final values (init_normal_row), so a half's copy into ``out``
            # never sees the other's work in progress
            new_bytes = (self._n - n0) * data.strides[0]
            split = new_bytes >= SPLIT_INIT_BYTES or to.nbytes >= SPLIT_ROWS_BYTES
            halves(init, [keys, rows, to], split_at=0 if split else 1 << 62)
        elif out is not None:
            self._gather(rows, out)
        return rows

    def _insert(
        self, keys: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64] | None = None
    ) -> npt.NDArray[np.int64]:
        """Row ids of ``keys`` (into ``rows`` if given), appending rows for the missing ones
        (not initialized), the arena and the index grown as they fill."""
        if rows is None:
            rows = np.empty(keys.shape[0], np.int64)
        pos = 0
        while True:
            max_rows = min(self._data.shape[0], _BUCKET_ROWS * self._index.shape[0])
            self._arena.ready(min(self._n + keys.shape[0] - pos, max_rows))
            pos, self._n = k.lookup_or_insert(self._index, self._n, max_rows, keys, rows, pos)
            if pos == keys.shape[0]:
                return rows
            self._grow()

    def _grow(self) -> None:
        """Double whichever of the arena and the index is full."""
        n = self._n
        if n >= self._data.shape[0]:
            self._grow_arena(n + 1)
        if n >= _BUCKET_ROWS * self._index.shape[0]:
            self._grow_index()

    def _grow_arena(self, need: int) -> None:
        self._arena.grow(need)
        self._data = self._arena.rows
        # fresh marks: zeros never equal a stamp, so the stamp count goes on
        self._mark = np.zeros(self._arena.capacity, np.uint8)

    def _grow_index(self, buckets: int = 0) -> None:
        index = k.new_index(buckets or 2 * self._index.shape[0])
        k.rehash(index, self._index)
        self._index = index
