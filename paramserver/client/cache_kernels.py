"""Compiled kernels of the worker's row cache (:mod:`paramserver.client.cache`).

The cache is set-associative: key ``k`` may live in one of ``WAYS`` slots of set
``mix64(k) & (sets - 1)``. A slot holds the key, its version (the clock its value stands
for: the clock it was fetched at, less the staleness the server reported for it), a use
count that picks whom to replace, and the row. Imported on first use (numba).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import numpy.typing as npt

from paramserver.mix import mix64

__all__ = ["EMPTY", "WAYS", "cache_fill", "cache_read"]

WAYS = 8
EMPTY = np.iinfo(np.int64).min
"""Version of an empty slot."""

_Arr = npt.NDArray[Any]
_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def _find(ckeys: _Arr, ver: _Arr, key: np.uint64, sets_mask: np.uint64) -> int:
    base = int(mix64(key) & sets_mask) * WAYS
    for w in range(WAYS):
        s = base + w
        if ver[s] != EMPTY and ckeys[s] == key:
            return s
    return -1


@_jit
def cache_read(
    ckeys: _Arr,
    ver: _Arr,
    uses: _Arr,
    vals: _Arr,
    keys: _Arr,
    clock: int,
    bound: int,
    out: _Arr,
    age: _Arr,
    miss: _Arr,
) -> int:
    """Copy the row of each key cached at most ``bound`` clocks stale into ``out[i]`` and its
    staleness into ``age[i]``; list the other positions in ``miss``. Returns how many missed.

    Two passes: the slots first, then the rows copied (the client imports no server kernels,
    so no prefetch hints here: the server's ``jit.prefetch`` would overlap these misses)."""
    sets_mask = np.uint64(ckeys.shape[0] // WAYS - 1)
    dim = out.shape[1]
    n = keys.shape[0]
    slot = np.empty(n, np.int64)
    n_miss = 0
    for i in range(n):
        s = _find(ckeys, ver, keys[i], sets_mask)
        if s >= 0 and clock - ver[s] <= bound:
            slot[i] = s
            age[i] = clock - ver[s]
            if uses[s] < 0xFFFF:
                uses[s] += 1
        else:
            slot[i] = -1
            age[i] = -1
            miss[n_miss] = i
            n_miss += 1
    for i in range(n):
        s = slot[i]
        if s >= 0:
            for j in range(dim):
                out[i, j] = vals[s, j]
    return n_miss


@_jit
def cache_fill(
    ckeys: _Arr,
    ver: _Arr,
    uses: _Arr,
    vals: _Arr,
    keys: _Arr,
    pos: _Arr,
    rows: _Arr,
    version: int,
    clock: int,
    bound: int,
    out: _Arr,
) -> int:
    """``out[pos[i]] = rows[i]``, and cache ``rows[i]`` under ``keys[pos[i]]`` at ``version``:
    in its own slot if cached, else an empty or expired one, else the set's least used (the
    set's use counts halve then, so that rows once hot make room in time). Returns how many
    live rows were replaced."""
    sets_mask = np.uint64(ckeys.shape[0] // WAYS - 1)
    dim = out.shape[1]
    evicted = 0
    m = pos.shape[0]
    slot = np.empty(m, np.int64)
    for i in range(m):
        key = keys[pos[i]]
        s = _find(ckeys, ver, key, sets_mask)
        if s < 0:
            base = int(mix64(key) & sets_mask) * WAYS
            best = -1
            for w in range(WAYS):
                t = base + w
                if ver[t] == EMPTY or clock - ver[t] > bound:
                    best = t
                    break
                if best < 0 or uses[t] < uses[best]:
                    best = t
            if ver[best] != EMPTY and clock - ver[best] <= bound:
                evicted += 1
                for w in range(WAYS):
                    uses[base + w] >>= 1
            s = best
            ckeys[s] = key
            uses[s] = 1
        ver[s] = version
        slot[i] = s
    for i in range(m):
        s = slot[i]
        p = pos[i]
        for j in range(dim):
            vals[s, j] = rows[i, j]
            out[p, j] = rows[i, j]
    return evicted
