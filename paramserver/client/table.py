"""What every table handle shares (:class:`TableHandle`): its spec, the staleness its pulls
were served with, the learning rate, the headers and gradient checks of its requests, and the
memory its pulls' results go into (:class:`ResultPool`)."""

from __future__ import annotations

import math
import sys
import warnings
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np

from paramserver.arrays import all_finite
from paramserver.client.session import Session, server_name
from paramserver.errors import ConfigError
from paramserver.spec import TableSpec

__all__ = ["PAGE", "ResultPool", "SharedResults", "TableHandle", "prefault"]

PAGE = 4096  # bytes of a memory page (a huge page is a multiple of it)
POOL_MIN_BYTES = 1 << 20  # smaller results: the allocator reuses freed memory by itself


def prefault(a: np.ndarray) -> None:
    """Write a zero into every page of ``a`` (C-contiguous). The kernel maps a fresh page on its
    first write, and a page fault costs more than copying the page: done while the servers
    work, the rows are then copied into mapped memory."""
    raw = a.reshape(-1).view(np.uint8)
    raw[::PAGE] = 0


class ResultPool:
    """Memory for a table's pull results whose pages are already mapped.

    A pull returns an array the caller owns. Large results come from the buffers of earlier
    results that the caller has let go of: CPython's reference count of a buffer says whether
    anything (the array, a view of it, a tensor made from it) still holds it. A training loop
    ``w = table.pull()`` holds one result while it asks for the next, so the pool keeps
    ``keep`` buffers: each step then writes into memory mapped before, where a fresh array of
    64 MiB would be mapped page by page (glibc gives arrays above 32 MiB back to the kernel when
    they are freed). The pool holds at most ``keep`` buffers of the largest result.

    Example:
        pool = ResultPool()
        out, fresh = pool.take((1000, 64), np.dtype(np.float32))
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._bufs: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[np.ndarray, bool]:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` that nobody else
        holds, and whether its memory is fresh (not yet mapped: see :func:`prefault`)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < POOL_MIN_BYTES:
            return np.empty(shape, dtype), False
        for i in range(len(self._bufs)):
            # 2: the list's reference and getrefcount's argument; nobody else holds it
            if self._bufs[i].nbytes >= nbytes and sys.getrefcount(self._bufs[i]) == 2:
                return self._bufs[i][:nbytes].view(dtype).reshape(shape), False
        buf = np.empty(nbytes, np.uint8)
        self._bufs.append(buf)
        if len(self._bufs) > self.keep:  # the oldest stays with whoever holds it
            self._bufs.pop(0)
        return buf.view(dtype).reshape(shape), True


class SharedResults:
    """A dense table's reply regions in its shared segment, handed out as pull results.

    The servers write a pull's values into the region its request names, and a plain
    ``pull()`` returns that region itself: no copy on the worker. A region is free when nothing
    holds it: the reference count of its array counts every result made of it (and the views
    of those, the tensors made from them) and every request in flight that names it, so a
    region is never written while anyone can see it. One free region is always kept back: with
    a single one free, the values land there and are copied into a result of the table's
    ``ResultPool`` (a caller who holds every result gets copies, not more memory). A push names
    a free region too: the servers write the new values there in the same pass (the mirror),
    and the next pull, naming that region, finds them there.

    Example:
        regions = SharedResults([seg.typed(1 + i, dtype, n) for i in range(3)])
        r, dirty, lent = regions.name(lend=True)   # None when no region is free
    """

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        # handed out writable since the servers last heard of the region: its contents may
        # differ from what they wrote there, whatever version they think it holds
        self.lent = [False] * len(arrays)
        self.last = 0  # the region the latest request named: the servers' values may be there
        self.handed = 0  # pulls answered with a region itself (no copy)

    def free(self) -> list[int]:
        """The regions nothing holds, the one named last first."""
        # 2: the list's reference and getrefcount's argument
        out = [i for i in range(len(self.arrays)) if sys.getrefcount(self.arrays[i]) == 2]
        if self.last in out:
            out.remove(self.last)
            out.insert(0, self.last)
        return out

    def name(self, lend: bool, always_dirty: bool = False) -> tuple[int, bool, bool] | None:
        """A free region for a request: (index, whether to tell the servers it was written
        since, whether the result may be that region itself: ``lend`` and another region stays
        free); None if none is free. ``always_dirty``: the servers that write it may not have
        heard of earlier changes (copies under replication)."""
        free = self.free()
        if not free:
            return None
        r = free[0]
        lent = lend and len(free) > 1
        dirty = self.lent[r] or always_dirty
        self.lent[r] = lent
        self.last = r
        return r, dirty, lent


class TableHandle:
    """What every table handle shares: its spec, staleness record, learning rate, and the
    headers and gradient checks of its requests."""

    def __init__(self, client: Session, spec: TableSpec) -> None:
        self.client = client
        self.spec = spec
        self.name = spec.name
        self.dtype = spec.np_dtype
        self._staleness: Counter[int] = Counter()
        self.results = ResultPool()
        self._pushed_at = -1  # this worker's clock at its last push to this table
        self._warned_unclocked = False

    def staleness(self) -> dict[int, int]:
        """Histogram of the staleness this worker's pulls were served with: {clocks: count}.

        Example:
            emb.staleness()    # {0: 950, 1: 40, 2: 10}
        """
        return dict(sorted(self._staleness.items()))

    def set_lr(self, lr: float, *, timeout: float | None = None) -> None:
        """Change the learning rate of this table's optimizer on every server.

        Example:
            emb.set_lr(0.01)
        """
        opt = self.spec.optimizer.with_lr(lr)
        futs = [
            self.client.endpoint.request(
                server_name(s),
                {"kind": "set_lr", "table": self.name, "lr": float(lr)},
                what=f"set_lr of table {self.name!r} on {server_name(s)}",
            )
            for s in self.client.servers
            # with replication a dead or rebuilding server is not asked (nor reachable)
            if self.client.replication == 1 or self.client.server_alive(s)
        ]
        for f in futs:
            f.result(timeout)
        self.spec = replace(self.spec, optimizer=opt)

    def check_grads(self, grads: Any, shape: tuple[int, ...], scan: bool = True) -> np.ndarray:
        """The gradient as a C-contiguous array, its dtype, shape and (``scan``: else the
        caller's to check, see :meth:`refuse_nonfinite`) values checked."""
        g = np.asarray(grads)
        if g.dtype != self.dtype:
            raise ConfigError(
                f"table {self.name!r}: gradient dtype must be {self.dtype}, got {g.dtype}"
            )
        if g.shape != shape:
            raise ConfigError(f"table {self.name!r}: gradient shape must be {shape}, got {g.shape}")
        # with nonfinite="skip" the servers drop the rows holding NaN or Inf themselves
        if scan and self.spec.nonfinite == "reject" and not all_finite(g):
            self.refuse_nonfinite()
        return np.ascontiguousarray(g)

    def refuse_nonfinite(self) -> None:
        raise ConfigError(
            f"table {self.name!r}: gradient contains NaN or Inf; push refused, "
            "the table is unchanged (create the table with nonfinite='skip' to drop such "
            "rows instead)"
        )

    def push_header(self) -> dict[str, Any]:
        c = self.client
        self._pushed_at = c.current_clock
        return {"kind": "push", "table": self.name, "rank": c.rank, "clock": c.current_clock,
                "seq": c.next_seq()}  # fmt: skip

    def pull_header(self, create: bool, timeout: float) -> dict[str, Any]:
        c = self.client
        if self._pushed_at == c.current_clock and self.spec.consistency == "sync":
            self._warn_unclocked()
        return {
            "kind": "pull",
            "table": self.name,
            "rank": c.rank,
            "clock": c.current_clock,
            "create": create,
            "timeout": timeout,
        }

    def _warn_unclocked(self) -> None:
        """Once per table: a sync pull cannot see this worker's own pushes of the same clock
        (they are applied when every worker has called ``clock()``); without ``clock()`` in the
        loop the rows stay at their initial values."""
        if self._warned_unclocked:
            return
        self._warned_unclocked = True
        c = self.client
        warnings.warn(
            f"table {self.name!r} is sync: this pull at clock {c.current_clock} does not see "
            f"worker[{c.rank}]'s pushes of clock {c.current_clock}; they are applied once every "
            "worker has called client.clock() (call it at the end of each step)",
            UserWarning,
            stacklevel=5,
        )

    def record_staleness(self, staleness: list[int]) -> None:
        self._staleness[max(staleness, default=0)] += 1
