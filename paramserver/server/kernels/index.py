"""The hash index of a sparse shard: keys to row ids, one 64-byte bucket per cache line.

``index``: ``(buckets, 8)`` uint64, ``buckets`` a power of two, each bucket one 64-byte cache
line: words 0-4 the keys of its 5 cells, words 5-7 their row ids + 1 as uint32 (0 = empty, so a
fresh index is ``np.zeros``). Open addressing: a key goes into the first free cell of its
bucket, then of the next buckets (linear probing over buckets), so a lookup reads one cache line
almost always. Every uint64 key is allowed (0 and 2**64-1 included): emptiness lives in the row
ids. The keys of the rows are kept only here; :func:`keys_by_row` gives them back in row order.
32-bit row ids: at most :data:`INDEX_MAX_ROWS` rows.

Example:
    >>> import numpy as np
    >>> index = new_index(2)
    >>> rows = np.empty(3, np.int64)
    >>> lookup_or_insert(index, 0, 4, np.array([5, 9, 5], np.uint64), rows, 0)
    (3, 2)
    >>> rows.tolist()
    [0, 1, 0]
"""

from __future__ import annotations

import numpy as np

from paramserver.mix import mix64
from paramserver.server.kernels.jit import AHEAD, Array, kernel, prefetch2

__all__ = [
    "BUCKET_CELLS",
    "INDEX_MAX_ROWS",
    "keys_by_row",
    "lookup",
    "lookup_or_insert",
    "new_index",
    "rehash",
]

_RING = 32  # > AHEAD: hashes of the keys between the one probed and the one prefetched
_M32 = np.uint64(0xFFFF_FFFF)
_S32 = np.uint64(32)
_Z64 = np.uint64(0)

BUCKET_CELLS = 5  # _probe reads the 5 cells without a loop
"""Cells (keys) a bucket of the index holds: 5 keys (40 bytes) and their 5 row ids (uint32, 20
bytes) fill one 64-byte cache line."""
_ROW_WORD = 5  # the row ids of cells 2j, 2j+1 are the low, high half of word 5+j
INDEX_MAX_ROWS = (1 << 32) - 1
"""Rows an index can address (row id + 1 is a uint32)."""


def new_index(buckets: int) -> Array:
    """Return an empty hash index of ``buckets`` buckets (a power of two), each 64 bytes on a
    64-byte boundary, so that a bucket is one cache line.

    Example:
        >>> new_index(4).shape
        (4, 8)
    """
    assert buckets > 0 and buckets & (buckets - 1) == 0, buckets
    # zeros: all cells empty, and the pages are mapped as the index fills
    raw = np.zeros((buckets + 1) * 8, np.uint64)
    skip = (-raw.ctypes.data % 64) // 8
    return raw[skip : skip + buckets * 8].reshape(buckets, 8)


@kernel
def _cell_row(index: Array, b: np.uint64, s: int) -> np.uint64:
    """Row id + 1 held by cell ``s`` of bucket ``b`` (0: empty)."""
    w: np.uint64 = index[b, _ROW_WORD + (s >> 1)]
    return (w >> np.uint64(32 * (s & 1))) & _M32


@kernel
def _set_cell(index: Array, b: np.uint64, s: int, key: np.uint64, v: np.uint64) -> None:
    index[b, s] = key
    index[b, _ROW_WORD + (s >> 1)] |= v << np.uint64(32 * (s & 1))


@kernel
def _probe(index: Array, key: np.uint64, h: np.uint64) -> tuple[np.uint64, int, np.uint64]:
    """Where ``key`` (hash ``h``) is, or the first empty cell of its probe sequence, where it
    would go: ``(bucket, cell, row id + 1 or 0)`` (the cell only when the key is absent).

    Cells fill in probe order and are never emptied, so a bucket with an empty
    cell ends the search, and its first empty cell follows its filled ones. A key
    is in at most one cell and an empty cell's row is 0, so OR-ing the rows of the
    cells whose key matches gives the row without a branch per cell (a branch on
    where in the bucket a key sits mispredicts every other lookup).
    """
    mask = np.uint64(index.shape[0] - 1)
    b = h & mask
    while True:
        w5 = index[b, 5]
        w6 = index[b, 6]
        r0, r1 = w5 & _M32, w5 >> _S32
        r2, r3 = w6 & _M32, w6 >> _S32
        r4 = index[b, 7] & _M32
        v = (
            (r0 if index[b, 0] == key else _Z64)
            | (r1 if index[b, 1] == key else _Z64)
            | (r2 if index[b, 2] == key else _Z64)
            | (r3 if index[b, 3] == key else _Z64)
            | (r4 if index[b, 4] == key else _Z64)
        )
        if v != 0:
            return b, 0, v
        if r4 == 0:
            return b, int(r0 != 0) + int(r1 != 0) + int(r2 != 0) + int(r3 != 0), _Z64
        b = (b + np.uint64(1)) & mask


@kernel
def _hash_ahead(index: Array, keys: Array, i: int, ring: Array) -> None:
    """Hash ``keys[i]`` into ``ring`` and prefetch its bucket: the lookups hash each key once,
    :data:`AHEAD` keys before they probe it."""
    h = mix64(keys[i])
    ring[i % _RING] = h
    prefetch2(index, h & np.uint64(index.shape[0] - 1), 0)


@kernel
def lookup(index: Array, keys: Array, rows: Array, kept: Array) -> int:
    """Write the row of each key into ``rows`` (-1 where absent); return how many were absent.
    ``kept``: empty, or as long as ``keys``, which are copied into it in the same pass (a
    stream of writes among the probes' waits on memory: nearly free, where a copy of its own
    reads the keys again)."""
    missing = 0
    n = keys.shape[0]
    keep = kept.shape[0] > 0
    ring = np.empty(_RING, np.uint64)
    for i in range(min(n, AHEAD)):
        _hash_ahead(index, keys, i, ring)
    for i in range(n):
        if i + AHEAD < n:
            _hash_ahead(index, keys, i + AHEAD, ring)
        if keep:
            kept[i] = keys[i]
        _, _, v = _probe(index, keys[i], ring[i % _RING])
        if v == 0:
            rows[i] = -1
            missing += 1
        else:
            rows[i] = np.int64(v) - 1
    return missing


@kernel
def lookup_or_insert(
    index: Array, n_rows: int, max_rows: int, keys: Array, rows: Array, start: int
) -> tuple[int, int]:
    """Find or append the row of each of ``keys[start:]``, writing row ids into ``rows``.

    New rows get ids ``n_rows, n_rows+1, ...``, so the rows created are exactly
    the range from the old to the new row count (:func:`init_rows` finds them in
    ``rows``). Stops early, before the insert that would make the row count
    exceed ``max_rows`` (at most :data:`INDEX_MAX_ROWS`); the caller grows the
    arrays and calls again from the returned position. Returns ``(position
    reached, new row count)``.
    """
    n = keys.shape[0]
    ring = np.empty(_RING, np.uint64)
    for i in range(start, min(n, start + AHEAD)):
        _hash_ahead(index, keys, i, ring)
    for i in range(start, n):
        if i + AHEAD < n:
            _hash_ahead(index, keys, i + AHEAD, ring)
        k = keys[i]
        b, s, v = _probe(index, k, ring[i % _RING])
        if v == 0:
            if n_rows >= max_rows:
                return i, n_rows
            _set_cell(index, b, s, k, np.uint64(n_rows + 1))
            rows[i] = n_rows
            n_rows += 1
        else:
            rows[i] = np.int64(v) - 1
    return n, n_rows


@kernel
def rehash(index: Array, old: Array) -> None:
    """Move every entry of index ``old`` into the empty ``index`` (used when the index grows)."""
    for ob in range(old.shape[0]):
        for os in range(BUCKET_CELLS):
            v = _cell_row(old, np.uint64(ob), os)
            if v != 0:
                k = old[ob, os]
                b, s, _ = _probe(index, k, mix64(k))
                _set_cell(index, b, s, k, v)


@kernel
def keys_by_row(index: Array, out: Array) -> None:
    """``out[r]`` = the key of row ``r`` for every row in the index (``out`` holds them all)."""
    for b in range(index.shape[0]):
        for s in range(BUCKET_CELLS):
            v = _cell_row(index, np.uint64(b), s)
            if v != 0:
                out[np.int64(v) - 1] = index[b, s]
