"""The worker's side of a step, compiled: the distinct keys of a batch and where each key went
(a hash table, in one pass), the sum of repeated keys' gradients (rows added in batch order,
so the result is the same, bit for bit, as adding them one after another), and the copies of
rows between a server's reply, the distinct keys' rows and the batch's rows.

Every kernel writes into arrays its caller gives, so that a table can reuse its buffers from
step to step (fresh memory is mapped page by page on first write, which costs more than the
copy). Large sums and copies run as two halves, one on a helper thread
(:func:`paramserver.parallel.halves`: a worker summing or placing rows has no request at the
server, so the other core is free); numba's ``parallel=True`` made them slower instead, on the
2-core machine the benchmarks run on (16 ms instead of 1.4 ms to expand 65,536 rows of 64:
its thread pool spins up per call and holds both cores).

Imported on first use by the tables, so that ``import paramserver`` does not load numba.

Example:
    >>> uniq, inverse = dedup(np.array([5, 3, 5], np.uint64))
    >>> uniq.tolist(), inverse.tolist()
    ([5, 3], [0, 1, 0])
    >>> summed = np.empty((2, 2), np.float32)
    >>> sum_rows_checked(inverse, np.ones((3, 2), np.float32), summed), summed.tolist()
    (True, [[2.0, 2.0], [1.0, 1.0]])
"""

from __future__ import annotations

import threading
from typing import Any

import numba
import numpy as np
import numpy.typing as npt

from paramserver.mix import mix64
from paramserver.parallel import both, halves, two_cores

__all__ = [
    "dedup",
    "expand_rows",
    "group_by_part",
    "place_rows",
    "sum_rows_checked",
]

_Arr = npt.NDArray[Any]

SPLIT_BYTES = 1 << 21
"""Bytes of rows written from which a sum of rows runs as two halves."""

SPLIT_COPY_BYTES = 1 << 23
"""Bytes of rows written from which a copy of rows (:func:`expand_rows`, :func:`place_rows`)
runs as two halves: a hand-off to the helper thread costs 70-90 us on the 2-core VM the
benchmarks run on, and a batch of 65,536 rows of 16 float32 (4 MiB, 0.25-0.5 ms) expanded in
halves was slower for it."""


@numba.njit(cache=True, nogil=True)
def _dedup(
    keys: npt.NDArray[np.uint64],
    table: npt.NDArray[np.int32],
    inverse: npt.NDArray[np.int64],
    uniq: npt.NDArray[np.uint64],
) -> int:
    mask = np.uint64(table.shape[0] - 1)
    table[:] = -1  # cell -> index into uniq, or empty
    count = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        cell = mix64(k) & mask
        while True:
            at = table[cell]
            if at < 0:
                table[cell] = count
                uniq[count] = k
                inverse[i] = count
                count += 1
                break
            if uniq[at] == k:
                inverse[i] = at
                break
            cell = (cell + np.uint64(1)) & mask
    return count


class _Scratch(threading.local):
    """The hash table of :func:`dedup`, kept between calls: one per thread, as the kernel runs
    without the GIL."""

    table = np.empty(0, np.int32)


_scratch = _Scratch()


def dedup(keys: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.intp]]:
    """The distinct keys of a 1-D uint64 array, in order of first appearance, and the position
    of each key among them (``uniq[inverse] == keys``).

    Example:
        uniq, inverse = dedup(batch_keys)
    """
    flat = np.ascontiguousarray(keys, dtype=np.uint64)
    n = flat.shape[0]
    if n >= 1 << 30:
        raise ValueError(f"dedup: {n} keys in one list; at most {(1 << 30) - 1}")
    size = 16
    while size < 2 * n:
        size *= 2
    table = _scratch.table
    if table.shape[0] < size:
        table = _scratch.table = np.empty(size, np.int32)
    inverse = np.empty(n, np.int64)
    uniq = np.empty(n, np.uint64)
    count = _dedup(flat, table[:size], inverse, uniq)
    return uniq[:count].copy(), inverse.astype(np.intp, copy=False)


@numba.njit(cache=True, nogil=True)
def _sum_rows(inverse: Any, grads: Any, out: Any, lo: int, hi: int, zero: Any) -> bool:
    # rows lo..hi-1 of out only: two calls on two threads share the work without sharing a row.
    # With distinct keys numbered in order of first appearance (dedup's), a row's first
    # gradient is written (zero + g: the bits of 0 + g, -0.0 included) rather than added to a
    # zeroed row, which saves a pass over out. Returns whether every sum is finite: x * 0 is
    # NaN exactly when x is not finite, and NaN stays in a sum (so do the worker's own NaN and
    # Inf, as Inf + -Inf is NaN), so one compare at the end checks the whole range.
    dim = grads.shape[1]
    check = np.zeros(dim, out.dtype)
    nxt = lo
    for i in range(inverse.shape[0]):
        row = inverse[i]
        if lo <= row < hi:
            if row == nxt:
                nxt += 1
                for j in range(dim):
                    x = grads[i, j] + zero
                    out[row, j] = x
                    check[j] += x * zero
            elif row < nxt:
                for j in range(dim):
                    x = out[row, j] + grads[i, j]
                    out[row, j] = x
                    check[j] += x * zero
            else:  # not in order of first appearance: sum into zeroed rows instead
                out[lo:hi] = 0
                check[:] = 0
                for i2 in range(inverse.shape[0]):
                    r = inverse[i2]
                    if lo <= r < hi:
                        for j in range(dim):
                            x = out[r, j] + grads[i2, j]
                            out[r, j] = x
                            check[j] += x * zero
                nxt = hi
                break
    out[nxt:hi] = 0  # rows no key went to
    return not np.any(check != 0)  # NaN != 0


def sum_rows_checked(inverse: npt.NDArray[np.intp], grads: _Arr, out: _Arr) -> bool:
    """``out[u] = sum of grads[i] for every i with inverse[i] == u``, rows added in the order
    of ``i``; ``grads`` and ``out`` are C-contiguous 2-D arrays of one float dtype and width,
    and every ``inverse[i]`` is a row of ``out``. Returns whether every value of ``out`` is
    finite: it is not when ``grads`` holds NaN or Inf (and when a sum overflowed), so a caller
    that must refuse a NaN or Inf gradient need not read ``grads`` a second time when it is.

    Example:
        ok = sum_rows_checked(inverse, grads, np.empty((len(uniq), grads.shape[1]), grads.dtype))
    """
    inv = np.ascontiguousarray(inverse, dtype=np.intp)
    n = out.shape[0]
    zero = out.dtype.type(0)
    if out.nbytes < SPLIT_BYTES or not two_cores():
        return bool(_sum_rows(inv, grads, out, 0, n, zero))
    h = n // 2
    a, b = both(
        lambda: _sum_rows(inv, grads, out, 0, h, zero),
        lambda: _sum_rows(inv, grads, out, h, n, zero),
    )
    return bool(a and b)


@numba.njit(cache=True, nogil=True)
def _expand(src: Any, inverse: Any, out: Any) -> None:
    dim = out.shape[1]
    for i in range(inverse.shape[0]):
        r = inverse[i]
        for j in range(dim):
            out[i, j] = src[r, j]


def expand_rows(src: _Arr, inverse: npt.NDArray[np.intp], out: _Arr) -> _Arr:
    """``out[i] = src[inverse[i]]`` (NumPy's ``src[inverse]``, written into ``out``): the rows
    of a batch from the rows of its distinct keys. Returns ``out``.

    Example:
        expand_rows(uniq_rows, inverse, np.empty((len(inverse), dim), uniq_rows.dtype))
    """
    halves(lambda o, inv: _expand(src, inv, o), [out, inverse], split_at=SPLIT_COPY_BYTES)
    return out


@numba.njit(cache=True, nogil=True)
def _place(src: Any, rows: Any, positions: Any, out: Any) -> None:
    dim = out.shape[1]
    for t in range(positions.shape[0]):
        r = rows[t]
        p = positions[t]
        for j in range(dim):
            out[p, j] = src[r, j]


def place_rows(
    src: _Arr, rows: npt.NDArray[np.intp], positions: npt.NDArray[np.intp], out: _Arr
) -> _Arr:
    """``out[positions[t]] = src[rows[t]]`` for every ``t`` (positions distinct): one server's
    rows put where the batch wants them. Returns ``out``.

    Example:
        place_rows(part, rows_in_part, batch_positions, result)
    """
    halves(
        lambda r, p: _place(src, r, p, out),
        [rows, positions],
        split_at=SPLIT_COPY_BYTES * rows.itemsize // max(1, out[:1].nbytes),
    )
    return out


@numba.njit(cache=True, nogil=True)
def _group(
    inverse: Any, part_of: Any, row_in_part: Any, bounds: Any, positions: Any, rows: Any
) -> None:
    for i in range(inverse.shape[0]):
        bounds[part_of[inverse[i]] + 1] += 1
    for p in range(bounds.shape[0] - 1):
        bounds[p + 1] += bounds[p]
    fill = bounds[:-1].copy()
    for i in range(inverse.shape[0]):
        b = inverse[i]
        p = part_of[b]
        at = fill[p]
        positions[at] = i
        rows[at] = row_in_part[b]
        fill[p] = at + 1


def group_by_part(
    inverse: npt.NDArray[np.intp],
    part_of: npt.NDArray[np.intp],
    row_in_part: npt.NDArray[np.intp],
    nparts: int,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The batch positions of each part's keys, in batch order: ``(positions, rows, bounds)``
    such that for part ``p`` and ``t`` in ``bounds[p]:bounds[p+1]``, batch key
    ``positions[t]`` is row ``rows[t]`` of that part. ``part_of[u]`` and ``row_in_part[u]``
    say where distinct key ``u`` went; ``inverse[i]`` is batch key ``i``'s distinct key.

    Example:
        pos, rows, bounds = group_by_part(inverse, part_of, row_in_part, len(parts))
    """
    bounds = np.zeros(nparts + 1, np.intp)
    positions = np.empty(len(inverse), np.intp)
    rows = np.empty(len(inverse), np.intp)
    _group(inverse, part_of, row_in_part, bounds, positions, rows)
    return positions, rows, bounds
