"""Checks on the arrays that users and peers hand over, in one place for the worker and the
server: keys (:func:`as_keys` for a user's, :func:`check_keys` for the wire's) and gradients
(:func:`all_finite`).

Example:
    keys = as_keys([7, 42, 7], "emb")         # uint64, validated
    all_finite(np.array([1.0, np.nan]))        # False
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

from paramserver.errors import ConfigError
from paramserver.loading import ready, use_kernels
from paramserver.parallel import halves

__all__ = ["all_finite", "as_keys", "check_keys", "copy_finite", "count_nonfinite", "load_kernels"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_CHUNK = 1 << 18  # values per np.isfinite of the NumPy path (a bounded temporary)
# Values that never start a worker's kernel loads (paramserver.loading): a dense table of up to
# 4 MiB of float32 is checked by NumPy (0.1-0.4 ms) until something else loads the kernels,
# instead of sharing its first steps with the loader's thread.
_SMALL = 1 << 20


def as_keys(keys: Any, table: str, *, int64_bits: bool = False) -> npt.NDArray[np.uint64]:
    """A user's keys (non-negative integers of any integer dtype and shape) as uint64.

    ``int64_bits``: an int64 array holds the bit patterns of uint64 keys (what a LongTensor of
    hashed ids holds: keys >= 2**63 are negative there) and is reinterpreted, not checked.

    Example:
        as_keys(np.array([3, 1]), "emb")
        as_keys(np.array([-1]), "emb", int64_bits=True)    # [18446744073709551615]
    """
    arr = np.asarray(keys)
    if arr.dtype == np.uint64:
        return arr
    if int64_bits and arr.dtype == np.int64:
        return arr.view(np.uint64)
    if arr.dtype.kind in "ui":
        if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
            bad = int(np.flatnonzero(arr.reshape(-1) < 0)[0])
            raise ConfigError(
                f"table {table!r}: keys must be non-negative integers, got "
                f"{arr.reshape(-1)[bad]} at position {bad}"
            )
        return arr.astype(np.uint64)
    raise ConfigError(
        f"table {table!r}: keys must be an array of unsigned integers, got dtype {arr.dtype}"
    )


def check_keys(keys: object, where: str) -> npt.NDArray[np.uint64]:
    """Keys as they travel and as shards take them: a 1-D uint64 array (contiguous on return);
    anything else is a ConfigError naming ``where``.

    Example:
        check_keys(np.arange(3, dtype=np.uint64), "pull of 'emb'")
    """
    if not isinstance(keys, np.ndarray) or keys.dtype != np.uint64 or keys.ndim != 1:
        got = (
            f"{keys.dtype} array of shape {keys.shape}"
            if isinstance(keys, np.ndarray)
            else type(keys).__name__
        )
        raise ConfigError(f"{where}: keys must be a 1-D uint64 array, got {got}")
    return np.ascontiguousarray(keys)


def count_nonfinite(bits: npt.NDArray[Any], exponent: Any) -> int:
    """How many of the floats whose raw bits are ``bits`` are inf or NaN (exponent all ones);
    a compiled kernel that releases the GIL.

    Example:
        count_nonfinite(np.array([1.0, np.inf], np.float32).view(np.uint32), np.uint32(0x7F800000))
    """
    return int(_count_kernel()(bits, exponent))


@functools.cache
def _count_kernel() -> Any:
    # compiled on first use: `import paramserver` must not load numba (1-2 s)
    import numba

    @numba.njit(cache=True, nogil=True)
    def count(bits: npt.NDArray[Any], exponent: Any) -> int:
        # integer compares on the bit pattern vectorize without fastmath
        c = 0
        for i in range(bits.shape[0]):
            if bits[i] & exponent == exponent:
                c += 1
        return c

    return count


@functools.cache
def _copy_count_kernel() -> Any:
    # the copy streams its lines past the cache: the segment it writes is read next by
    # another process, and a plain store would first read each line it overwrites
    from paramserver.nontemporal import copy_count

    return copy_count


def load_kernels() -> None:
    """Load the compiled finite check and checked copy of float32 and float64 values from
    numba's cache (a worker's loader calls this: :mod:`paramserver.client.warm`).

    Example:
        load_kernels()
    """
    for bits, mask in ((np.uint32, 0x7F80_0000), (np.uint64, 0x7FF0_0000_0000_0000)):
        raw = np.zeros(2, bits)
        _count_kernel()(raw, bits(mask))
        _copy_count_kernel()(raw, np.empty_like(raw), bits(mask))


def copy_finite(src: npt.NDArray[Any], dst: npt.NDArray[Any]) -> bool:
    """Copy ``src`` into ``dst`` (same dtype and length, 1-D, C-contiguous) and say whether
    every value was finite: one pass where :func:`all_finite` then a copy make two (a plain
    dense push into shared memory), with streaming stores (``nontemporal.copy_count``).
    ``dst`` is written either way.

    Example:
        >>> dst = np.empty(2, np.float32)
        >>> copy_finite(np.array([1.0, np.nan], np.float32), dst)
        False
    """
    if src.dtype not in _FLOATS or not (src.flags.c_contiguous and dst.flags.c_contiguous):
        np.copyto(dst, src)
        return all_finite(src)
    if not _compiled(len(src)):
        np.copyto(dst, src)
        return _finite_numpy(src)
    uint = np.uint32 if src.dtype == np.float32 else np.uint64
    mask = np.uint32(0x7F80_0000) if src.dtype == np.float32 else np.uint64(0x7FF0_0000_0000_0000)
    kernel = _copy_count_kernel()
    return sum(int(c) for c in halves(kernel, [src.view(uint), dst.view(uint)], mask)) == 0


def all_finite(a: npt.NDArray[Any]) -> bool:
    """Whether every element of ``a`` is finite: one pass over the raw bits, split over two
    cores for large arrays, without temporaries.

    Example:
        >>> all_finite(np.array([1.0, np.inf]))
        False
    """
    if a.dtype.kind in "iub":
        return True
    if a.dtype in _FLOATS and (a.flags.c_contiguous or a.flags.f_contiguous):
        flat = a.ravel(order="A")
        if not _compiled(len(flat)):
            return _finite_numpy(flat)
        mask: np.unsignedinteger[Any]
        if a.dtype == np.float32:
            bits, mask = flat.view(np.uint32), np.uint32(0x7F80_0000)
        else:
            bits, mask = flat.view(np.uint64), np.uint64(0x7FF0_0000_0000_0000)
        return sum(int(c) for c in halves(count_nonfinite, [bits], mask)) == 0
    return bool(np.isfinite(a).all())


def _compiled(n: int) -> bool:
    """Whether to check ``n`` values with the compiled kernels: not in a worker whose kernels
    are not loaded yet (the NumPy path meanwhile), and a short array never starts the loads."""
    return ready() if n <= _SMALL else use_kernels()


def _finite_numpy(flat: npt.NDArray[Any]) -> bool:
    """:func:`all_finite` of a 1-D array in NumPy, a bounded chunk at a time."""
    return all(bool(np.isfinite(flat[i : i + _CHUNK]).all()) for i in range(0, len(flat), _CHUNK))
