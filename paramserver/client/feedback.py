"""Error feedback for encoded pushes: what rounding took off a gradient is added to the next
push of the same key (sparse) or element (dense), so that the sum of the gradients the servers
apply tracks the true sum and rounding does not bias the optimizer (1-bit SGD, Seide 2014;
EF-SGD, Karimireddy 2019).

A dense table keeps one residual per element (:class:`DenseFeedback`). A sparse table keeps
residual rows in a bounded open-addressing map (:class:`SparseFeedback`): at most ``capacity``
keys, each found within :data:`PROBES` slots of its hash. A key that finds neither its slot nor
a free one takes over the slot at its hash, and the residual of the key that held it is dropped:
at most one rounding error of that key is lost, never more. Compiled kernels work over a
push's whole key array; numba is loaded only by a worker that pushes with a codec.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import numpy.typing as npt

from paramserver.wire.codec import F16_MAX, decode_flat, decode_rows, encode_flat, encode_rows

__all__ = ["PROBES", "RESIDUAL_BYTES", "DenseFeedback", "SparseFeedback"]

Array = npt.NDArray[Any]

PROBES = 8  # slots a key may look at from its hash on
RESIDUAL_BYTES = 32 << 20  # a sparse table's residual rows take at most this much per worker

_jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")


@_jit
def _slot_of(key: np.uint64, mask: np.uint64) -> np.uint64:
    # splitmix64's finalizer: consecutive keys spread over the whole map
    z = key + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & mask


@_jit
def add_residuals(
    keys: Array, grads: Array, tags: Array, used: Array, rows: Array, out: Array, slots: Array
) -> None:
    """``out[i] = grads[i] + residual of keys[i]`` (0 if it has none) and ``slots[i]`` = the
    slot that will hold its new residual (claimed, or taken over, for a key without one)."""
    mask = np.uint64(len(tags) - 1)
    n, dim = grads.shape
    for i in range(n):
        k = keys[i]
        home = _slot_of(k, mask)
        found = np.int64(-1)
        free = np.int64(-1)
        for p in range(PROBES):
            s = np.int64((home + np.uint64(p)) & mask)
            if used[s]:
                if tags[s] == k:
                    found = s
                    break
            elif free < 0:
                free = s
        if found >= 0:
            for j in range(dim):
                out[i, j] = grads[i, j] + rows[found, j]
            slots[i] = found
        else:
            s = free if free >= 0 else np.int64(home)  # full near its hash: take over home
            used[s] = True
            tags[s] = k
            for j in range(dim):
                out[i, j] = grads[i, j]
            slots[i] = s


@_jit
def keep_residuals(slots: Array, sent: Array, applied: Array, rows: Array) -> None:
    """``rows[slots[i]] = sent[i] - applied[i]``: what rounding took off, 0 where not finite
    (a NaN row the servers skip leaves no residual behind)."""
    n, dim = sent.shape
    for i in range(n):
        s = slots[i]
        for j in range(dim):
            r = sent[i, j] - applied[i, j]
            rows[s, j] = r if np.isfinite(r) else 0.0


@_jit
def lookup_residuals(keys: Array, tags: Array, used: Array, rows: Array, out: Array) -> None:
    """``out[i]`` = the residual kept for ``keys[i]`` (left as it is for a key without one)."""
    mask = np.uint64(len(tags) - 1)
    for i in range(len(keys)):
        home = _slot_of(keys[i], mask)
        for p in range(PROBES):
            s = np.int64((home + np.uint64(p)) & mask)
            if used[s] and tags[s] == keys[i]:
                out[i, :] = rows[s, :]
                break


def _prepare(values: np.ndarray, codec: str) -> np.ndarray:
    """What to encode: float16 gets a copy clipped to what it can hold (the excess stays in the
    residual, taken from the unclipped values)."""
    return np.clip(values, -F16_MAX, F16_MAX) if codec == "float16" else values


class SparseFeedback:
    """Residual rows of one sparse table, keyed by uint64 key, at most ``capacity`` of them.

    Example:
        fb = SparseFeedback(dim=16, dtype=np.dtype(np.float32))
        arrays = fb.encode(keys, grads, "int8")     # what the push carries; residuals kept
    """

    def __init__(self, dim: int, dtype: np.dtype[Any], capacity: int | None = None) -> None:
        if capacity is None:
            capacity = max(1024, RESIDUAL_BYTES // (dim * dtype.itemsize))
        cap = 1 << max(4, int(capacity).bit_length() - 1)  # a power of two, at most capacity
        self.dim = dim
        self.dtype = dtype
        self.capacity = cap
        self.tags = np.zeros(cap, np.uint64)
        self.used = np.zeros(cap, np.bool_)
        self.rows = np.zeros((cap, dim), dtype)  # mapped on first touch: keys seen cost pages

    def encode(self, keys: np.ndarray, grads: np.ndarray, codec: str) -> list[np.ndarray]:
        """The arrays that carry ``grads`` (n, dim) for distinct ``keys`` in ``codec``, each
        row plus its key's residual; the new residuals are kept."""
        n = len(keys)
        sent = np.empty((n, self.dim), self.dtype)
        slots = np.empty(n, np.int64)
        add_residuals(keys, grads, self.tags, self.used, self.rows, sent, slots)
        arrays = encode_rows(_prepare(sent, codec), codec)
        applied = decode_rows(arrays, codec, self.dim, self.dtype)
        keep_residuals(slots, sent, applied, self.rows)
        return arrays

    def residual(self, keys: np.ndarray) -> np.ndarray:
        """The residual rows now kept for ``keys`` (0 for a key without one); for tests and
        for a final flush."""
        out = np.zeros((len(keys), self.dim), self.dtype)
        lookup_residuals(keys, self.tags, self.used, self.rows, out)
        return out


class DenseFeedback:
    """The residual of every element of one dense table.

    Example:
        fb = DenseFeedback(size=1000, dtype=np.dtype(np.float32))
        arrays = fb.encode(grad, 0, 500, "bfloat16")    # what the push to [0:500] carries
    """

    def __init__(self, size: int, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self.values = np.zeros(size, dtype)

    def encode(self, grad: np.ndarray, start: int, stop: int, codec: str) -> list[np.ndarray]:
        """The arrays that carry ``grad[start:stop]`` plus its residual in ``codec``; the new
        residual of that range is kept."""
        resid = self.values[start:stop]
        sent = grad[start:stop] + resid
        arrays = encode_flat(_prepare(sent, codec), codec)
        np.subtract(sent, decode_flat(arrays, codec, stop - start, self.dtype), out=resid)
        resid[~np.isfinite(resid)] = 0.0
        return arrays
