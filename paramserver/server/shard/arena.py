"""Row storage that grows without copying: :class:`Arena`, an address range reserved once.

A sparse shard's rows live in one ``(capacity, stride)`` array, which the kernels index
directly. Growing it by allocating a doubled array and copying stalled the request that
crossed the boundary (262,144 to 524,288 rows at dim 64 with Adagrad: 134 MB copied into
pages faulted one by one, 345 ms instead of 22). Here the array is a view of an anonymous
mapping reserved once with ``MAP_NORESERVE`` (address space only: no memory is committed,
and the kernel fills pages with zeros as rows are first written), so growing is taking a
longer view of the same memory: nothing is copied and no row moves.

Pages are mapped ahead of the rows appended by one ``madvise(MADV_POPULATE_WRITE)`` call, not
one page fault per 4 KiB page while a request writes its new rows (on this machine a fault
cost more than zeroing the page; `python benchmarks/traffic.py --server-only` shows the pulls
that create rows): between requests by a background thread (:meth:`Arena.ready_soon`, which
``SparseShard.prepare`` asks for), and in a request only the pages its new rows may need that
were not asked for before (:meth:`Arena.ready`). Huge pages are not
asked for: under the default ``defrag=madvise``, ``MADV_HUGEPAGE`` makes faults compact
memory first, and the pulls that created rows got slower with it, not faster.

Where no such reservation can be made (another OS, an address-space limit, more rows than
were reserved), the arena falls back to doubling with a copy, as before.

Example:
    >>> import numpy as np
    >>> a = Arena(4, np.float32, capacity=2)
    >>> a.rows[1] = 1.0
    >>> a.grow(1000)
    >>> a.capacity >= 1000, float(a.rows[1, 0])
    (True, 1.0)
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["RESERVE_BYTES", "Arena"]

RESERVE_BYTES = 1 << 36
"""Address space reserved per arena (64 GiB, of 128 TiB a process may map): rows past it
fall back to growth by copy."""
_MAP_NORESERVE = 0x4000  # Linux; Python's mmap module does not export it
_MADV_POPULATE_WRITE = 23  # Linux 5.14
POPULATE = True


def _reserve(nbytes: int) -> mmap.mmap | None:
    if not sys.platform.startswith("linux"):
        return None
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    try:
        region = mmap.mmap(-1, nbytes, flags=flags)
    except (OSError, OverflowError, ValueError):
        return None
    return region


@functools.cache
def _populator() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="paramserver-populate")


@functools.cache
def _libc_madvise() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)  # a foreign call: the GIL is released in it
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _populate(address: int, nbytes: int) -> None:
    # mmap.madvise holds the GIL for the whole call; a failure (an older kernel) only means
    # that pages fault in one by one
    _libc_madvise()(address, nbytes, _MADV_POPULATE_WRITE)


class Arena:
    """A growable ``(capacity, stride)`` array of rows; :attr:`rows` is the array to index.

    :meth:`grow` keeps every row where it is (a longer view of the reserved range) when the
    reservation allows it, and otherwise doubles with a copy. :attr:`rows` must be read again
    after a grow.
    """

    def __init__(self, stride: int, dtype: npt.DTypeLike, capacity: int) -> None:
        self.stride = stride
        self.dtype = np.dtype(dtype)
        row_bytes = stride * self.dtype.itemsize
        self._region = _reserve(RESERVE_BYTES) if capacity * row_bytes <= RESERVE_BYTES else None
        self._ready = 0  # rows whose pages are mapped, or asked to be (ready_soon)
        self._address = 0
        if self._region is not None:
            whole = np.frombuffer(self._region, self.dtype, RESERVE_BYTES // self.dtype.itemsize)
            self._whole: npt.NDArray[Any] | None = whole[: (RESERVE_BYTES // row_bytes) * stride]
            self._whole = self._whole.reshape(-1, stride)
            self._address = int(whole.ctypes.data)
            self.rows = self._whole[:capacity]
        else:
            self._whole = None
            self.rows = np.empty((capacity, stride), self.dtype)

    @property
    def capacity(self) -> int:
        """Rows the arena holds now."""
        return int(self.rows.shape[0])

    @property
    def reserved(self) -> bool:
        """Whether growth is copy-free (an address range is reserved)."""
        return self._whole is not None

    def ready(self, n: int) -> None:
        """Have the pages of rows ``[0, n)`` mapped (``n`` at most :attr:`capacity`): those not
        mapped or asked for yet, in one call (``MADV_POPULATE_WRITE``, Linux 5.14) instead of
        one page fault per page as rows are appended. Only those: it runs inside a request
        (mapping 32 MiB at a time here stalled one Zipf step in four by 7-9 ms, each time a
        batch brought a few more keys than the one before it, past what the background thread
        had mapped). Where the kernel lacks it, pages fault in one by one as before."""
        span = self._unasked(n)
        if span is None:
            return
        lo, hi = span
        assert self._region is not None  # (else no span)
        try:
            self._region.madvise(_MADV_POPULATE_WRITE, lo, hi - lo)
        except (OSError, ValueError):
            self._ready = 1 << 62  # this kernel maps pages on fault only: stop asking
            return
        self._ready = hi // (self.stride * self.dtype.itemsize)

    def _unasked(self, n: int) -> tuple[int, int] | None:
        """The byte range of the pages of rows ``[0, n)`` not mapped or asked for yet (None if
        none, or if pages are mapped on fault only)."""
        if self._region is None or n <= self._ready or not POPULATE:
            return None
        row_bytes = self.stride * self.dtype.itemsize
        lo = self._ready * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(-(-n * row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE, self.capacity * row_bytes)
        return lo, hi

    def ready_soon(self, n: int) -> None:
        """:meth:`ready`, the pages mapped by a background thread (the kernel zeroes each:
        8 ms for 32 MiB here) while the caller goes on; not waited for. A row written before
        its page is mapped faults it in as without this, so nothing depends on when it ends."""
        span = self._unasked(n)
        if span is None:
            return
        lo, hi = span
        self._ready = hi // (self.stride * self.dtype.itemsize)
        start = self._address + lo
        _populator().submit(_populate, start, hi - lo)

    def grow(self, need: int) -> None:
        """Make room for at least ``need`` rows (doubling), keeping rows ``[0, capacity)``."""
        cap = self.capacity
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        if self._whole is not None and need <= self._whole.shape[0]:
            self.rows = self._whole[: min(cap, self._whole.shape[0])]
            return
        rows = np.empty((cap, self.stride), self.dtype)
        rows[: self.capacity] = self.rows
        self.rows = rows
        self._whole = None  # past the reservation: from here on, growth copies
        self._region = None  # unmapped once the last view of it goes
