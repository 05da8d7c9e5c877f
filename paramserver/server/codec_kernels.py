"""Compiled row encoders for the value codecs (the server side of :mod:`paramserver.wire.codec`).

Each kernel does in one pass what :func:`paramserver.wire.codec.encode_rows` does with several NumPy
passes, and gives bit-identical results for float32 rows (tested against it). Kept apart from
``kernels.py`` so that editing one file does not invalidate numba's cache of the other, and so
that a server without codec tables never compiles or loads them.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import numpy.typing as npt

from paramserver.wire.codec import encode_rows

__all__ = ["encode_rows_fast"]

Array = npt.NDArray[Any]

_jit = numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=False, error_model="numpy")


@_jit
def _f32_to_f16(b: np.uint32) -> np.uint16:
    # IEEE binary32 -> binary16 bits, round to nearest even (what NumPy's astype does)
    sign = (b >> 16) & 0x8000
    e = np.int64((b >> 23) & 0xFF)
    m = np.int64(b & 0x7FFFFF)
    if e == 0xFF:
        if m == 0:
            return np.uint16(sign | 0x7C00)
        nan = m >> 13  # NaN keeps its top payload bits (as NumPy does), and stays a NaN
        return np.uint16(sign | 0x7C00 | (nan if nan != 0 else 1))
    e16 = e - 112
    if e16 >= 31:
        return np.uint16(sign | 0x7C00)
    if e16 <= 0:
        if e16 < -10:
            return np.uint16(sign)
        m |= 0x800000
        shift = 14 - e16
        half = np.int64(1) << (shift - 1)
        r = m >> shift
        rem = m & ((np.int64(1) << shift) - 1)
        if rem > half or (rem == half and (r & 1) == 1):
            r += 1
        return np.uint16(sign | r)
    r = (e16 << 10) | (m >> 13)
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (r & 1) == 1):
        r += 1  # a carry into the exponent is right, up to inf
    return np.uint16(sign | r)


@_jit
def encode_float16(bits: Array, out: Array) -> None:
    """``out`` (uint16) = float16 bit patterns of the float32 values whose bits are ``bits``."""
    n, dim = bits.shape
    for i in range(n):
        for j in range(dim):
            out[i, j] = _f32_to_f16(bits[i, j])


@_jit
def encode_bfloat16(bits: Array, out: Array) -> None:
    """``out`` (uint16) = bfloat16 bits of float32 ``bits``, round to nearest even."""
    n, dim = bits.shape
    for i in range(n):
        for j in range(dim):
            b = bits[i, j]
            if (b & 0x7FFFFFFF) > 0x7F800000:  # NaN stays a (quiet) NaN
                out[i, j] = np.uint16((b >> 16) | 0x40)
            else:
                out[i, j] = np.uint16((b + (0x7FFF + ((b >> 16) & 1))) >> 16)


@_jit
def encode_int8(rows: Array, q: Array, scale: Array) -> None:
    """Per row: ``scale = max|x| / 127``, ``q = rint(x / scale)`` (a zero row: all 0)."""
    n, dim = rows.shape
    for i in range(n):
        amax = np.float32(0.0)
        for j in range(dim):
            a = abs(rows[i, j])
            if a > amax:
                amax = a
        s = np.float32(amax / np.float32(127.0))
        scale[i] = s
        inv = np.float32(np.float32(1.0) / s) if s > 0 else np.float32(0.0)
        for j in range(dim):
            v = np.rint(np.float32(rows[i, j] * inv))
            if v > 127:
                v = 127
            elif v < -127:
                v = -127
            q[i, j] = np.int8(v)


def encode_rows_fast(rows: np.ndarray, codec: str) -> list[np.ndarray]:
    """:func:`paramserver.wire.codec.encode_rows`, compiled for float32 rows."""
    if codec == "none" or rows.dtype != np.float32 or rows.ndim != 2:
        return encode_rows(rows, codec)
    rows = np.ascontiguousarray(rows)
    if codec == "int8":
        q = np.empty(rows.shape, np.int8)
        scale = np.empty(len(rows), np.float32)
        encode_int8(rows, q, scale)
        return [q, scale]
    out = np.empty(rows.shape, np.uint16)
    if codec == "float16":
        encode_float16(rows.view(np.uint32), out)
        return [out.view(np.float16)]
    if codec == "bfloat16":
        encode_bfloat16(rows.view(np.uint32), out)
        return [out]
    return encode_rows(rows, codec)
