"""A worker-side cache of a sparse table's hot rows with bounded staleness (HET, VLDB 2022).

``client.sparse_table(..., cache=CacheSpec(rows=..., staleness=N, flush_every=M))`` keeps up
to ``rows`` rows on the worker. A pull serves a cached row while it is at most ``N`` clocks
stale and asks the servers only for the others; a push adds its gradients to a local
accumulator, sent as one push (repeated keys summed) every ``M`` pushes and at ``clock()``.

Versions are counted in clocks: a row fetched at clock ``f`` from a server that reported
staleness ``s`` stands for version ``f - s``; read at clock ``c`` it is ``c - (f - s)`` stale,
and the cache serves it only while that is at most ``N`` (so a row the servers served
already stale is kept for less long). Every read's staleness is counted per row
(:meth:`RowCache.stats`), and each pull's largest goes into the table's ``staleness()``.

What a cached run gives up, and by how much:

* a read misses the updates of the last ``N`` clocks at most (its own worker's included:
  the cached value is not updated locally, and local gradients reach the servers at most
  ``M`` pushes, or one clock, later);
* gradients kept when the worker closes without a last ``clock()`` or ``flush()`` are not
  sent;
* gradients are summed before they reach the servers: under SGD the final weights are those
  of an uncached run with the same gradients (up to the order of float additions); under an
  optimizer with state (Adagrad, Adam, FTRL) ``M`` pushes of a key become one update of
  their sum.

Example:
    emb = client.sparse_table("emb", dim=64, optimizer=ps.optim.Adagrad(lr=0.05),
                              cache=ps.CacheSpec(rows=100_000, staleness=2, flush_every=4))
    rows = emb.pull(keys); emb.push(keys, grads); client.clock()
    emb.cache.stats()   # {'hits': ..., 'misses': ..., 'staleness': {0: ..., 1: ...}, ...}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.errors import ConfigError
from paramserver.wire.future import Future

__all__ = ["CacheSpec", "RowCache", "check_cache"]


@dataclass(frozen=True)
class CacheSpec:
    """How a worker caches a sparse table: at most ``rows`` rows, served at most ``staleness``
    clocks stale; local gradients flushed every ``flush_every`` pushes and at ``clock()``.

    Example:
        >>> CacheSpec(rows=1024, staleness=2, flush_every=4).rows
        1024
    """

    rows: int = 65_536
    staleness: int = 1
    flush_every: int = 1

    def __post_init__(self) -> None:
        for name, low in (("rows", 1), ("staleness", 0), ("flush_every", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(
                    f"CacheSpec field {name!r}: expected an integer >= {low}, got {v!r}"
                )


def check_cache(table: str, consistency: str, cache: object) -> None:
    """Refuse a ``cache=`` option that is not a :class:`CacheSpec`, or one on a table whose
    consistency forbids stale reads ("sync"), before anything is created.

    Example:
        >>> check_cache("emb", "async", CacheSpec())
    """
    if cache is None:
        return
    if not isinstance(cache, CacheSpec):
        raise ConfigError(f"table {table!r}: cache must be a ps.CacheSpec, got {cache!r}")
    if consistency == "sync":
        raise ConfigError(
            f"table {table!r}: a cache serves rows up to {cache.staleness} clocks stale, which "
            "a 'sync' table forbids; use consistency='async' or 'ssp:N', or no cache"
        )


class RowCache:
    """The rows and pending gradients of one table on one worker (see the module docstring).

    Example:
        >>> c = RowCache(CacheSpec(rows=16), dim=2, dtype=np.dtype(np.float32))
        >>> c.capacity
        16
    """

    def __init__(self, spec: CacheSpec, dim: int, dtype: np.dtype[Any]) -> None:
        from paramserver.client.cache_kernels import EMPTY, WAYS

        self.spec = spec
        sets = 1
        while sets * WAYS < spec.rows:
            sets *= 2
        n = sets * WAYS
        self.capacity = n
        self._keys = np.zeros(n, np.uint64)
        self._ver = np.full(n, EMPTY, np.int64)
        self._uses = np.zeros(n, np.uint16)
        self._vals = np.zeros((n, dim), dtype)
        self._acc: tuple[np.ndarray, np.ndarray] | None = None  # kept keys and gradients
        self._spare: tuple[np.ndarray, np.ndarray] | None = None  # the other pair, maybe sending
        self._spare_busy: Future[None] | None = None
        self._rows = 0  # rows kept in _acc
        self._kept = 0  # pushes kept
        self._age = np.empty(0, np.int64)
        self._miss = np.empty(0, np.intp)
        self._counts: Counter[str] = Counter()
        self._staleness: Counter[int] = Counter()

    def read(self, keys: np.ndarray, clock: int, out: np.ndarray) -> tuple[np.ndarray, int]:
        """Serve the cached rows of ``keys`` into ``out``; return the positions that missed
        and the largest staleness served (-1: none served)."""
        from paramserver.client.cache_kernels import cache_read

        n = len(keys)
        if self._age.shape[0] < n:
            self._age = np.empty(n, np.int64)
            self._miss = np.empty(n, np.intp)
        age, miss = self._age[:n], self._miss[:n]
        b = self.spec.staleness
        n_miss = cache_read(self._keys, self._ver, self._uses, self._vals, keys, clock, b, out,
                            age, miss)  # fmt: skip
        hits = age[age >= 0]
        self._counts["hits"] += n - n_miss
        self._counts["misses"] += n_miss
        if len(hits):
            for a, c in enumerate(np.bincount(hits).tolist()):
                if c:
                    self._staleness[a] += c
        return miss[:n_miss].copy(), int(hits.max()) if len(hits) else -1

    def fill(
        self,
        keys: np.ndarray,
        pos: np.ndarray,
        rows: np.ndarray,
        clock: int,
        served_staleness: int,
        out: np.ndarray,
    ) -> None:
        """Place the fetched ``rows`` of ``keys[pos]`` into ``out[pos]`` and cache them."""
        from paramserver.client.cache_kernels import cache_fill

        version = clock - served_staleness
        self._counts["evictions"] += cache_fill(
            self._keys, self._ver, self._uses, self._vals, keys, pos, rows, version, clock,
            self.spec.staleness, out,
        )  # fmt: skip
        self._staleness[served_staleness] += len(pos)

    def add(self, keys: np.ndarray, grads: np.ndarray) -> bool:
        """Keep a push's keys and gradients for the next flush (copied into buffers whose pages
        stay mapped; the flush's push sums repeated keys, once); True when a flush is due
        (``flush_every`` pushes kept)."""
        n, m = self._rows, len(keys)
        acc = self._acc
        if acc is None or acc[0].shape[0] < n + m:
            grown = (
                np.empty(2 * (n + m), np.uint64),
                np.empty((2 * (n + m), grads.shape[1]), grads.dtype),
            )
            if acc is not None and n:
                grown[0][:n], grown[1][:n] = acc[0][:n], acc[1][:n]
            acc = self._acc = grown
        acc[0][n : n + m] = keys
        acc[1][n : n + m] = grads
        self._rows = n + m
        self._kept += 1
        self._counts["pushes"] += 1
        return self._kept >= self.spec.flush_every

    def take_pending(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The keys and gradients kept since the last flush (repeats allowed: the push sums
        them); None if there are none. They stay valid until :meth:`release` is given the
        push that sends them and it is done."""
        if self._acc is None or not self._rows:
            return None
        keys, grads = self._acc[0][: self._rows], self._acc[1][: self._rows]
        self._counts["flushes"] += 1
        self._counts["rows_flushed"] += self._rows
        self._rows = self._kept = 0
        return keys, grads

    def release(self, sending: Future[None]) -> None:
        """The buffers just taken are read by ``sending``: kept for the next pushes if it is
        done, else set aside while it is sent (the other pair, if free, takes the next)."""
        if sending.done():
            return
        free = self._spare_busy is None or self._spare_busy.done()
        reuse = self._spare if free else None
        self._spare, self._spare_busy = self._acc, sending
        self._acc = reuse

    def forget(self) -> None:
        """Drop every cached row (the table's rows were written over: ``assign``, ``restore``);
        the gradients kept for the next flush stay.

        Example:
            emb.cache.forget()
        """
        from paramserver.client.cache_kernels import EMPTY

        self._ver.fill(EMPTY)

    @property
    def pending(self) -> int:
        """Pushes kept, not yet flushed."""
        return self._kept

    def stats(self) -> dict[str, Any]:
        """Hits, misses, evictions, pushes, flushes, rows flushed, and the staleness of every
        row read ({clocks: rows}; a missed row counts at the staleness the server reported).

        Example:
            emb.cache.stats()["staleness"]   # {0: 60000, 1: 5000}
        """
        keys = ("hits", "misses", "evictions", "pushes", "flushes", "rows_flushed")
        return {
            **{k: int(self._counts[k]) for k in keys},
            "staleness": dict(sorted(self._staleness.items())),
        }
