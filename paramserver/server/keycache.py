"""The key-list cache of one sparse table on a server.

A worker that sends the same key list again and again (a fixed vocabulary, a batch it pulls and
then pushes) gives it a signature: the first request carries the keys and the signature, later
ones the signature only. The server keeps what the keys resolved to, the row ids and whether any
row repeats, so those requests skip the hash lookup. Row ids stay valid: rows are never moved
or dropped. Pure state, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["KEY_CACHE_ENTRIES", "KeyCache"]

KEY_CACHE_ENTRIES = 32  # per table; a worker keeps fewer, so its live signatures stay here


class KeyCache:
    """(worker rank, signature) -> (row ids, whether any row repeats); the least recently used
    entry goes first once it holds ``entries``.

    Example:
        cache = KeyCache(entries=2)
        cache.put(0, 7, np.array([3, 1]), False)
        cache.get(0, 7)          # (array([3, 1]), False)
        cache.get(1, 7)          # None: signatures are per worker
    """

    def __init__(self, entries: int = KEY_CACHE_ENTRIES) -> None:
        self.entries = entries
        self.lists: OrderedDict[tuple[int, int], tuple[np.ndarray, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.lists)

    def put(self, rank: int, sig: int, rows: np.ndarray, duplicates: bool) -> None:
        self.lists[rank, sig] = (rows, duplicates)
        while len(self.lists) > self.entries:
            self.lists.popitem(last=False)

    def get(self, rank: int, sig: int) -> tuple[np.ndarray, bool] | None:
        found = self.lists.get((rank, sig))
        if found is not None:
            self.lists.move_to_end((rank, sig))
        return found
