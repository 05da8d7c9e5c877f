"""The worker's side of a step, compiled: the distinct keys of a batch and where each key went
(a hash table, in one pass), and the sum of repeated keys' gradients (rows added in batch
order, so the result is the same, bit for bit, as adding them one after another).

Imported on first use by the tables, so that ``import paramserver`` does not load numba.

Example:
    >>> uniq, inverse = dedup(np.array([5, 3, 5], np.uint64))
    >>> uniq.tolist(), inverse.tolist()
    ([5, 3], [0, 1, 0])
    >>> sum_rows(inverse, np.ones((3, 2), np.float32), 2).tolist()
    [[2.0, 2.0], [1.0, 1.0]]
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import numpy.typing as npt

from paramserver.mix import mix64

__all__ = ["dedup", "sum_rows"]

_EMPTY = np.int64(-1)


@numba.njit(cache=True, nogil=True)
def _dedup(
    keys: npt.NDArray[np.uint64], inverse: npt.NDArray[np.int64], uniq: npt.NDArray[np.uint64]
) -> int:
    n = keys.shape[0]
    size = 16
    while size < 2 * n:
        size *= 2
    mask = np.uint64(size - 1)
    table = np.full(size, -1, np.int64)  # cell -> index into uniq, or empty
    count = 0
    for i in range(n):
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


def dedup(keys: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.intp]]:
    """The distinct keys of a 1-D uint64 array, in order of first appearance, and the position
    of each key among them (``uniq[inverse] == keys``).

    Example:
        uniq, inverse = dedup(batch_keys)
    """
    flat = np.ascontiguousarray(keys, dtype=np.uint64)
    inverse = np.empty(flat.shape[0], np.int64)
    uniq = np.empty(flat.shape[0], np.uint64)
    count = _dedup(flat, inverse, uniq)
    return uniq[:count].copy(), inverse.astype(np.intp, copy=False)


@numba.njit(cache=True, nogil=True)
def _sum_rows(inverse: npt.NDArray[np.intp], grads: Any, out: Any) -> None:
    out[:] = 0
    dim = grads.shape[1]
    for i in range(inverse.shape[0]):
        row = inverse[i]
        for j in range(dim):
            out[row, j] += grads[i, j]


def sum_rows(inverse: npt.NDArray[np.intp], grads: npt.NDArray[Any], n: int) -> npt.NDArray[Any]:
    """``out[u] = sum of grads[i] for every i with inverse[i] == u``, rows added in the order
    of ``i``; ``grads`` is 2-D, ``out`` has ``n`` rows of its dtype.

    Example:
        summed = sum_rows(inverse, grads, len(uniq))
    """
    g = np.ascontiguousarray(grads)
    out = np.empty((n, g.shape[1]), g.dtype)
    _sum_rows(np.ascontiguousarray(inverse, dtype=np.intp), g, out)
    return out
