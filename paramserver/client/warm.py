"""The worker's compiled kernels, loaded off its requests' path (:mod:`paramserver.loading`).

A worker's long pulls and pushes use numba kernels (its import checks for BLAS by importing
SciPy's ``linalg``, then about eight kernels load from numba's cache: 0.3-0.5 s on an idle
machine). :func:`start_warming` registers :func:`warm_kernels` as the process's loader and
starts it on a daemon thread from ``connect`` on (its registration, the tables' creation).
Until it has run, requests take their NumPy paths (same values), so none waits for it.
(A pull of a short key list never needs the kernels: :data:`paramserver.partition.SMALL_KEYS`.)

Example:
    start_warming()  # returns at once; later calls do nothing
"""

from __future__ import annotations

import logging

import numpy as np

from paramserver import loading

__all__ = ["hold_warming", "start_warming", "warm_kernels"]

log = logging.getLogger(__name__)


def warm_kernels() -> None:
    """Load the kernels of a worker's sparse pull and push of float32 rows (one server and
    several), of the hash ring, and of the finite check of float32 and float64 gradients (and
    of the copy that checks them, a dense push into shared memory): the compiled paths that
    :func:`paramserver.loading.use_kernels` sends requests to once this has run.

    Example:
        warm_kernels()
    """
    from paramserver.arrays import load_kernels
    from paramserver.client import kernels as k
    from paramserver.mix import splitmix64

    try:
        splitmix64(np.zeros(2, np.uint64), np.uint64(0))  # routing a long key list
        keys = np.arange(2, dtype=np.uint64)
        _, inverse = k.dedup(keys)
        inverse = np.ascontiguousarray(inverse, dtype=np.int64)
        rows = np.zeros((2, 1), np.float32)
        k.expand_rows(rows, inverse, np.empty_like(rows))
        k.sum_rows_checked(inverse, rows, np.empty_like(rows))
        pos, at, _ = k.group_by_part(inverse, np.zeros(2, np.int64), inverse, 1)
        k.place_rows(rows, at, pos, np.empty_like(rows))
        load_kernels()  # all_finite and copy_finite, float32 and float64
    except Exception:  # only an optimization: the compiled path loads what it needs itself
        log.debug("warming the worker's kernels failed", exc_info=True)


def start_warming() -> None:
    """Make :func:`warm_kernels` this process's loader and start it on a daemon thread, once
    (nothing after :func:`hold_warming`; a long request starts it then).

    Example:
        start_warming()
    """
    loading.register(warm_kernels)
    loading.start()


def hold_warming() -> None:
    """Load nothing ahead of need in this process: for a worker that shares its cores with the
    servers it connects to (:meth:`~paramserver.launch.LocalCluster.connect`), where a thread
    loading numba held the GIL through the first requests and took the CPU the servers answer
    them with (a first pull of 8 keys took 0.5-1.0 s instead of 0.3-0.5 s on two busy cores).
    The first long request starts the loads; it and those behind it take the NumPy paths until
    they are done.

    Example:
        hold_warming()
    """
    loading.hold()
