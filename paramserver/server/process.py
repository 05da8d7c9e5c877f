"""A server process's set-up: malloc arenas, memory handed back when idle, kernels warmed.

Nothing here knows the loop; ``paramserver.launch`` calls :func:`tune_allocator` and starts
:func:`warm_kernels` before a ``Server`` registers.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from typing import Any

import numpy as np

from paramserver.arrays import all_finite
from paramserver.init import Zeros
from paramserver.optim import SGD
from paramserver.server.shard import DenseShard, SparseShard

__all__ = ["TRIM_AFTER_BYTES", "trim_allocator", "tune_allocator", "warm_kernels"]

log = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 32 << 20  # received since the last trim: worth handing memory back
M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def libc_call(name: str, *args: int) -> None:
    """Call a glibc function if this is glibc (else nothing)."""
    fn = getattr(libc(), name, None) if sys.platform.startswith("linux") else None
    if fn is not None:
        fn(*args)


@functools.cache
def libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): allocator tuning is skipped
        return None


def tune_allocator() -> None:
    """Limit glibc malloc to two arenas in this (server) process. Every thread that allocates
    (libzmq's I/O thread receives the messages) otherwise gets its own arena, and freed
    message buffers stay in each: 28 MiB of a server's RSS holding 1M rows with Adagrad.
    Call it before threads start.

    Example:
        tune_allocator()
    """
    libc_call("mallopt", M_ARENA_MAX, 2)


def trim_allocator() -> None:
    """Hand the allocator's free memory back to the system (freed message buffers, grown and
    replaced arrays).

    Example:
        trim_allocator()
    """
    libc_call("malloc_trim", 0)


def warm_kernels() -> None:
    """Load the compiled kernels of a first pull and push from numba's cache. Meant for a
    background thread of a server process, started before it registers: the loads overlap the
    registration and the worker's table creation instead of delaying the first pull.

    First those of a sparse float32 table, then those of small dense tables (the initializer
    and an SGD push, float32 and float64, and the finite check of their gradients): the
    training programs keep their job-wide figures in one (``models.program.JobStats``), whose
    first creation and push otherwise waited for these loads (30-80 ms in every run).

    numba's first kernel load checks for BLAS by importing ``scipy.linalg`` when SciPy is
    installed (0.3-0.7 s and ~15 MiB of a server's memory here); no kernel uses BLAS, so SciPy
    is hidden from that check. Only call this in a server process: the check's answer stays.

    Example:
        threading.Thread(target=warm_kernels, daemon=True).start()
    """
    hide = "scipy.linalg" not in sys.modules
    if hide:  # import scipy.linalg -> ImportError
        sys.modules["scipy.linalg"] = None  # type: ignore[assignment]
    try:
        shard = SparseShard(1, np.dtype(np.float32), Zeros(), SGD(), 0)
        keys = np.arange(2, dtype=np.uint64)
        shard.pull(keys)
        shard.push(keys, np.zeros((2, 1), np.float32))
        shard.contains(keys)  # the lookup of large requests' halves (SparseShard._find_or_create)
        shard.prepare()
        for dtype in (np.float32, np.float64):
            grad = np.zeros(2, dtype)
            all_finite(grad)
            dense = DenseShard(2, np.dtype(dtype), Zeros(), SGD(), 0)
            dense.push(grad)
            dense.push(grad, out=np.empty(2, dtype))
    except Exception:  # only an optimization: the real request compiles what it needs
        log.debug("warming the kernels failed", exc_info=True)
    finally:
        if hide and "scipy.linalg" in sys.modules and sys.modules["scipy.linalg"] is None:
            del sys.modules["scipy.linalg"]
