"""How the server's kernels are compiled (:func:`kernel`) and the prefetch hints they share.

Every kernel is a numba function over whole arrays (``nogil`` so that a server may run one
beside its socket threads; no ``fastmath`` so that float32 arithmetic rounds exactly like
NumPy's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt
from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic

__all__ = [
    "AHEAD",
    "Array",
    "Scalar",
    "inline",
    "kernel",
    "prefetch",
    "prefetch2",
    "prefetch_span",
    "row_ahead",
]

Array = npt.NDArray[Any]
Scalar = np.floating[Any]
_F = TypeVar("_F", bound=Callable[..., Any])
# numba's extension API is partly annotated; seen through Any, the code generators type-check.
cgutils: Any = _cgutils
intrinsic: Any = _intrinsic


def kernel(fn: _F) -> _F:
    # boundscheck off and fastmath off are numba's defaults; spelled out because both matter.
    # error_model="numpy": IEEE division (x/0 -> inf) instead of a ZeroDivisionError check,
    # a branch that kept the division loops from vectorizing (Adagrad 5x slower).
    return cast(
        _F,
        numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=False, error_model="numpy")(
            fn
        ),
    )


def inline(fn: _F) -> _F:
    """A piece of kernels, inlined into each in numba's IR: the kernel compiles to the same code
    as with its lines written in it."""
    return cast(
        _F,
        numba.njit(inline="always", nogil=True, boundscheck=False, error_model="numpy")(fn),
    )


def _prefetch_codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
    aryty = signature.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, list(args[1:]), wraparound=False)
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
    )
    # (address, write, locality 3 = keep in all cache levels, data cache)
    builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
    return context.get_dummy_value()


@intrinsic  # type: ignore[untyped-decorator]
def prefetch(typingctx: Any, arr: Any, i: Any) -> Any:
    """Hint the CPU to fetch ``arr[i]``: random row accesses overlap instead of queueing.

    Without it, the long dependency chains of sqrt and division fill the
    out-of-order window and the misses run one after another (Adagrad on 1M
    rows: 5 M rows/s without, 24 M rows/s with).
    """
    return types.void(arr, i), _prefetch_codegen


@intrinsic  # type: ignore[untyped-decorator]
def prefetch2(typingctx: Any, arr: Any, i: Any, j: Any) -> Any:
    """:func:`prefetch` of ``arr[i, j]``."""
    return types.void(arr, i, j), _prefetch_codegen


AHEAD = 16
"""How many keys ahead the kernels prefetch."""


@kernel
def prefetch_span(data: Array, r: int, width: int) -> None:
    """Prefetch the cache lines of ``data[r, :width]``."""
    step = max(1, 64 // data.itemsize)
    for off in range(0, width, step):
        prefetch2(data, r, off)
    prefetch2(data, r, width - 1)


@inline
def row_ahead(data: Array, rows: Array, i: int) -> Array:
    """Row ``rows[i]`` of ``data``, after prefetching the row :data:`AHEAD` keys later: the
    head of every loop over rows."""
    n = rows.shape[0]
    if i + AHEAD < n:
        prefetch_span(data, rows[i + AHEAD], data.shape[1])
    row: Array = data[rows[i]]
    return row
