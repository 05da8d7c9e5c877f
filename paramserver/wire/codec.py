"""Value codecs: how a table's values travel on the wire, in pull replies and in pushes.

A table chooses its codecs when it is created (``codec=``, and ``push_codec=`` where pushes
should differ; see :class:`paramserver.spec.TableSpec`). Pull replies: the server encodes the
rows of a sparse table's reply, or a dense range (:func:`encode_flat`) when the worker asks for
it (``codec`` in the pull header), and the worker decodes them to the table's dtype. Pushes:
the worker encodes the gradient (``codec`` in the push header) and the server decodes it
(:func:`decode_pushed`) before the optimizer sees it. The worker keeps what rounding took off
each row or element and adds it to its next push of the same key or range (error feedback,
:mod:`paramserver.client.feedback`): the sum of the gradients applied tracks the true sum, so
rounding does not bias the optimizer. The table itself always stays in its own dtype. A
message without ``codec`` carries values in the table's dtype, as before codecs.

A dense range travels as one flat array; ``int8`` scales it in blocks of :data:`BLOCK`
elements (the last block may be short).

===========  ==========================  =========================================
codec        frames of a reply           error of one value (x, its row r)
===========  ==========================  =========================================
``none``     rows in the table's dtype   0
``float16``  float16 rows                IEEE half rounding (2**-11 relative; values
                                         beyond 65504 become inf, below 6e-8 become 0)
``bfloat16`` uint16 bit patterns         round to nearest even, 2**-8 relative
``int8``     int8 rows, float32 scales   max(abs(r)) / 254 (a zero row is exact)
===========  ==========================  =========================================

Pure NumPy; imports neither zmq nor the server.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "BLOCK",
    "CODECS",
    "F16_MAX",
    "decode_flat",
    "decode_pushed",
    "decode_rows",
    "encode_flat",
    "encode_rows",
    "encoded_arrays",
]

CODECS = ("none", "float16", "bfloat16", "int8")
BLOCK = 256  # elements of a dense range that share one int8 scale
F16_MAX = 65504.0  # the largest finite float16; a pushed value beyond it is clipped there


def encoded_arrays(codec: str) -> int:
    """How many arrays carry values in ``codec`` (int8: the values and their scales)."""
    return 2 if codec == "int8" else 1


def encode_rows(rows: np.ndarray, codec: str) -> list[np.ndarray]:
    """The arrays that carry ``rows`` (n, dim) in ``codec``.

    Example:
        q, scale = encode_rows(np.ones((2, 4), np.float32), "int8")
    """
    if codec == "none":
        return [rows]
    if codec == "float16":
        return [rows.astype(np.float16)]
    if codec == "bfloat16":
        return [_to_bfloat16(rows)]
    if codec == "int8":
        amax = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(len(rows))
        scale = (amax / 127.0).astype(np.float32)
        # a zero row: scale 0, divide by 1 (its values are 0 and come back exactly 0)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        q = np.rint(rows * inv[:, None])
        np.clip(q, -127, 127, out=q)
        return [q.astype(np.int8), scale]
    raise ValueError(f"unknown codec {codec!r}")


def decode_rows(arrays: list[np.ndarray], codec: str, dim: int, dtype: Any) -> np.ndarray:
    """Rows (n, dim) of ``dtype`` from the arrays of a reply; ValueError if they do not fit.

    Example:
        rows = decode_rows(encode_rows(r, "float16"), "float16", r.shape[1], np.float32)
    """
    want = {"none": np.dtype(dtype), "float16": np.dtype(np.float16)}
    want["bfloat16"] = np.dtype(np.uint16)
    want["int8"] = np.dtype(np.int8)
    count = 2 if codec == "int8" else 1
    if len(arrays) != count:
        raise ValueError(f"a {codec} reply carries {count} arrays, got {len(arrays)}")
    rows = arrays[0]
    if rows.ndim != 2 or rows.shape[1] != dim or rows.dtype != want[codec]:
        raise ValueError(f"a {codec} reply has rows {rows.shape} {rows.dtype}")
    if codec == "none":
        return rows
    if codec == "float16":
        # a table lookup of all 65536 half values: 3x faster than NumPy's half conversion
        return np.take(_half_table(), rows.view(np.uint16)).astype(dtype, copy=False)
    if codec == "bfloat16":
        bits = rows.astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32).astype(dtype, copy=False)
    scale = arrays[1]
    if scale.shape != (len(rows),) or scale.dtype != np.float32:
        raise ValueError(f"an int8 reply has scales {scale.shape} {scale.dtype}")
    out = rows.astype(dtype)
    out *= scale[:, None]
    return out


@functools.cache
def _half_table() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _to_bfloat16(rows: np.ndarray) -> np.ndarray:
    # round to nearest, ties to even, on the float32 bit pattern; NaN stays NaN (quiet)
    f = np.ascontiguousarray(rows, dtype=np.float32)
    bits = f.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def encode_flat(
    values: np.ndarray,
    codec: str,
    encode: Callable[[np.ndarray, str], list[np.ndarray]] | None = None,
) -> list[np.ndarray]:
    """The flat arrays that carry a dense range ``values`` (n,) in ``codec`` (int8: one scale
    per :data:`BLOCK` elements); ``encode``: the row encoder (default :func:`encode_rows`; the
    server passes its compiled one).

    Example:
        q, scale = encode_flat(np.ones(1000, np.float32), "int8")   # (1000,) int8, (4,) float32
    """
    n = len(values)
    rows = encode or encode_rows
    if codec != "int8":
        return [a.reshape(-1) for a in rows(values.reshape(1, n), codec)]
    blocks = -(-n // BLOCK)
    padded = np.zeros(blocks * BLOCK, values.dtype)
    padded[:n] = values
    q, scale = rows(padded.reshape(blocks, BLOCK), codec)
    return [q.reshape(-1)[:n], scale]


def decode_flat(arrays: list[np.ndarray], codec: str, n: int, dtype: Any) -> np.ndarray:
    """A dense range (n,) of ``dtype`` from :func:`encode_flat`'s arrays; ValueError if they
    do not fit.

    Example:
        x = decode_flat(encode_flat(v, "bfloat16"), "bfloat16", len(v), np.float32)
    """
    if codec not in CODECS or codec == "none":
        raise ValueError(f"unknown codec {codec!r}")
    count = encoded_arrays(codec)
    if len(arrays) != count:
        raise ValueError(f"a {codec} range carries {count} arrays, got {len(arrays)}")
    if arrays[0].shape != (n,):
        raise ValueError(f"a {codec} range of {n} values has shape {arrays[0].shape}")
    if codec != "int8":
        return decode_rows([arrays[0].reshape(1, n)], codec, n, dtype).reshape(n)
    blocks = -(-n // BLOCK)
    if arrays[0].dtype != np.int8:
        raise ValueError(f"an int8 range has values of {arrays[0].dtype}")
    padded = np.zeros(blocks * BLOCK, np.int8)
    padded[:n] = arrays[0]
    rows = decode_rows([padded.reshape(blocks, BLOCK), arrays[1]], codec, BLOCK, dtype)
    return rows.reshape(-1)[:n]


def decode_pushed(
    arrays: list[np.ndarray], codec: str, kind: str, size: int, dtype: Any
) -> list[np.ndarray]:
    """The arrays of a push with their encoded gradient decoded: a sparse push's trailing
    arrays become rows (n, ``size``), a dense push's become its range (``size``,). The arrays
    before them (the keys) stay as they are. ValueError if they do not fit.

    Example:
        keys, grads = decode_pushed([keys, q, scale], "int8", "sparse", 16, np.float32)
    """
    if codec not in CODECS or codec == "none":
        raise ValueError(f"unknown codec {codec!r}")
    count = encoded_arrays(codec)
    if len(arrays) < count:
        raise ValueError(f"a {codec} gradient needs {count} arrays, got {len(arrays)}")
    head, enc = arrays[: len(arrays) - count], arrays[len(arrays) - count :]
    if kind == "dense":
        return [*head, decode_flat(enc, codec, size, dtype)]
    return [*head, decode_rows(enc, codec, size, dtype)]
