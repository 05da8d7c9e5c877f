"""The one 64-bit mixing function: splitmix64's finalizer, a bijection of uint64 with full
avalanche. Server kernels call :func:`mix64` on one value; routing keys to servers
(:mod:`paramserver.partition`) and hashing features (:mod:`paramserver.data.hashing`) call
:func:`splitmix64` over whole arrays, compiled.

Example:
    >>> int(splitmix64(np.array([1], np.uint64), np.uint64(0))[0]) == int(mix64(np.uint64(1) + GOLDEN))
    True
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import numpy.typing as npt

__all__ = ["GOLDEN", "mix64", "splitmix64"]

GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)
_M1 = np.uint64(0xBF58_476D_1CE4_E5B9)
_M2 = np.uint64(0x94D0_49BB_1331_11EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


@numba.njit(cache=True, nogil=True, inline="always")
def mix64(z: np.uint64) -> np.uint64:
    """splitmix64's finalizer of one value (call it from compiled code; from Python it works
    too, one value at a time).

    Example:
        >>> int(mix64(np.uint64(1))) != 1
        True
    """
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(cache=True, nogil=True)
def _splitmix64(keys: npt.NDArray[np.uint64], salt: np.uint64, out: npt.NDArray[np.uint64]) -> None:
    for i in range(keys.shape[0]):
        out[i] = mix64((keys[i] ^ salt) + GOLDEN)


def splitmix64(keys: npt.NDArray[Any], salt: np.uint64) -> npt.NDArray[np.uint64]:
    """splitmix64 of ``keys ^ salt`` (the golden-ratio step, then :func:`mix64`) for every key
    of an array of any shape; uint64 out.

    Example:
        splitmix64(np.arange(3, dtype=np.uint64), np.uint64(7))
    """
    flat = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
    out = np.empty_like(flat)
    _splitmix64(flat, np.uint64(salt), out)
    return out.reshape(np.shape(keys))
