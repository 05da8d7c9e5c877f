"""The worker's compiled kernels loaded ahead, on a background thread.

A worker's first pull and push need numba (its import checks for BLAS by importing SciPy's
``linalg``) and about eight kernels from numba's cache: 0.3-0.5 s on an idle machine, which
a worker otherwise spends inside its first pull, after connecting. :func:`start_warming` loads
them on a daemon thread instead, from ``connect`` on (its registration, the tables' creation).
(A pull of a short key list needs none: :data:`paramserver.partition.SMALL_KEYS`.) A kernel the thread has not loaded yet
is loaded by whoever calls it first (numba serializes the loads), so nothing waits longer
than it did.

Example:
    start_warming()  # returns at once; later calls do nothing
"""

from __future__ import annotations

import logging
import threading

import numpy as np

__all__ = ["hold_warming", "start_warming", "warm_kernels"]

log = logging.getLogger(__name__)

_started = threading.Event()


def warm_kernels() -> None:
    """Load the kernels of a worker's first sparse pull and push of float32 rows (one server
    and several), of the hash ring, and of the finite check of float32 and float64 gradients
    (and of the copy that checks them, a dense push into shared memory).

    Example:
        warm_kernels()
    """
    from paramserver.arrays import all_finite, copy_finite
    from paramserver.client import kernels as k
    from paramserver.mix import splitmix64

    try:
        splitmix64(np.zeros(2, np.uint64), np.uint64(0))  # routing a long key list
        keys = np.arange(2, dtype=np.uint64)
        _, inverse = k.dedup(keys)
        inverse = np.ascontiguousarray(inverse, dtype=np.int64)
        rows = np.zeros((2, 1), np.float32)
        k.expand_rows(rows, inverse, np.empty_like(rows))
        k.sum_rows_into(inverse, rows, np.empty_like(rows))
        pos, at, _ = k.group_by_part(inverse, np.zeros(2, np.int64), inverse, 1)
        k.place_rows(rows, at, pos, np.empty_like(rows))
        all_finite(rows)
        all_finite(np.zeros(2, np.float64))
        for dtype in (np.float32, np.float64):
            copy_finite(np.zeros(2, dtype), np.empty(2, dtype))
    except Exception:  # only an optimization: the real request loads what it needs
        log.debug("warming the worker's kernels failed", exc_info=True)


def start_warming() -> None:
    """Start :func:`warm_kernels` on a daemon thread, once per process.

    Example:
        start_warming()
    """
    if _started.is_set():
        return
    _started.set()
    threading.Thread(target=warm_kernels, name="warm-worker-kernels", daemon=True).start()


def hold_warming() -> None:
    """Keep this process from loading the kernels ahead (:func:`start_warming` does nothing
    from now on; they load on first use). For a worker that shares its cores with the servers
    it connects to (:meth:`~paramserver.launch.LocalCluster.connect`): there the thread held
    the GIL through the first requests and took the CPU the servers answer them with (a first
    pull of 8 keys took 0.5-1.0 s instead of 0.3-0.5 s on two busy cores), and a short pull
    needs no kernels at all (:data:`paramserver.partition.SMALL_KEYS`).

    Example:
        hold_warming()
    """
    _started.set()
