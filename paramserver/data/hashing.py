"""Feature hashing: (field, value) pairs to uint64 keys, and numeric bucketization. Vectorized.

A key is ``splitmix64(value_hash, field_salt(field))`` (:mod:`paramserver.mix`): the same (field, value) gives the same key in
every process and run (no Python ``hash``), different fields never share a key by construction
of the salt, and keys spread evenly over the hash ring. Strings are hashed by pandas' vectorized
SipHash (``pandas.util.hash_array``, fixed key), integers directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from paramserver.mix import splitmix64

__all__ = ["bucketize_log", "hash_field", "hash_strings"]


def hash_strings(values: Any) -> np.ndarray:
    """uint64 hashes of an array of strings (or bytes), the same in every process.

    Example:
        hash_strings(np.array(["a", "b"], dtype=object))
    """
    import pandas as pd

    arr = np.asarray(values)
    if arr.dtype.kind != "O":
        arr = arr.astype(object)
    out: np.ndarray = pd.util.hash_array(arr.reshape(-1), categorize=False)
    return out.reshape(arr.shape)


def hash_field(field: int, values: np.ndarray) -> np.ndarray:
    """Keys of ``values`` (uint64 value ids or hashes) of field number ``field``.

    Example:
        keys = hash_field(3, np.array([17, 17, 99], dtype=np.uint64))   # two distinct keys
    """
    salt = splitmix64(np.array([field * 0x10001 + 0x51], dtype=np.uint64), np.uint64(0))[0]
    return splitmix64(np.asarray(values), salt)


def bucketize_log(values: np.ndarray) -> np.ndarray:
    """Criteo's usual bucketization of counts: ``v`` for v <= 2, else ``floor(log(v)**2)``;
    missing (NaN) is bucket ``2**32`` and negatives are bucket ``2**32 + 1``.

    Example:
        bucketize_log(np.array([0, 2, 100, np.nan]))   # [0, 2, 21, 4294967296]
    """
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, 1 << 32, dtype=np.uint64)
    ok = np.isfinite(v)
    neg = ok & (v < 0)
    small = ok & (v >= 0) & (v <= 2)
    big = ok & (v > 2)
    out[neg] = (1 << 32) + 1
    out[small] = v[small].astype(np.uint64)
    out[big] = np.floor(np.log(v[big]) ** 2).astype(np.uint64)
    return out
