"""Streaming (non-temporal) stores, for passes that write a large array nobody reads soon.

A plain store to a line that is not in the cache first reads that line (a read for ownership):
copying 64 MiB then moves 192 MiB through memory where streaming stores, which write whole
lines around the cache, move 128. Two passes of a plain dense step write such arrays: the
worker's copy of a gradient into the shared segment (:func:`copy_count`, behind
``arrays.copy_finite``) and the server's SGD writing the new weights into the reply region
(``server/kernels/optim.sgd_copy``, with :func:`sgd_line`); :func:`copy` for other large
copies into memory another process reads. At 64 MiB on one core the copy took 0.69x and the
SGD 0.60x the time of plain stores (``python benchmarks/dense.py --stores``; docs/performance.md,
"Dense plain arrays on one host").

The kernels work one cache line (:data:`LINE` bytes, a vector of the element type) at a time
from the first line boundary of the destination, with plain stores before it, after the last
whole line and for arrays below :data:`STREAM_BYTES`, and end with :func:`store_fence`:
streaming stores are weakly ordered, and the message that says the values are there must not
overtake them. numba has no vector type,
so the lines are intrinsics written in LLVM IR; the rounding is the scalar code's (a multiply
then a subtract, never fused). Where the machine is not x86-64 (:data:`STREAMING` False) the
same kernels store plainly and fence nothing.

Compiled on first use: only modules that run kernels import this one (it loads numba). numba's
cache checks a kernel's own file only: after changing a line here, remove the cached
``sgd_copy`` (``server/kernels/__pycache__/optim.sgd_copy-*``) or touch ``optim.py``.

Example:
    >>> import numpy as np
    >>> inf = np.full(STREAM_BYTES // 4 + 5, 0x7F800000, np.uint32)    # float32 inf
    >>> dst = np.empty_like(inf)
    >>> copy_count(inf, dst, np.uint32(0x7F800000)) == len(inf) and bool((dst == inf).all())
    True
"""

from __future__ import annotations

import platform
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic

from paramserver.parallel import halves

__all__ = [
    "LINE",
    "STREAMING",
    "copy",
    "copy_count",
    "copy_line",
    "sgd_line",
    "store_fence",
    "stream_start",
]

# numba's extension API is partly annotated; seen through Any, the code generators type-check
cgutils: Any = _cgutils
intrinsic: Any = _intrinsic

LINE = 64
"""Bytes per cache line: what one streaming store writes."""

STREAMING = platform.machine().lower() in ("x86_64", "amd64")
"""Whether the stores are streaming (x86-64) or plain (elsewhere)."""

STREAM_BYTES = 4 << 20
"""Arrays below this size are written with plain stores: what the reader takes next may still
be in a cache then, and streaming it out costs more than the reads it saves. A copy then a pass
over the copy, one core (``python benchmarks/dense.py --stores``, loaded machine): streaming
2.2x slower at 256 KiB, 1.1x at 1 MiB, even at 2-8 MiB, 2.6-2.7x faster at 16-64 MiB."""

_I32 = ir.IntType(32)


def _contiguous(*arrays: Any) -> bool:
    # a line is read and written as one vector: only C-contiguous 1-D arrays qualify
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays)


def _line(context: Any, builder: Any, aryty: Any, ary: Any, i: Any) -> tuple[Any, Any]:
    """(pointer to the line of ``ary`` starting at element ``i`` as a vector, vector type)."""
    arr = context.make_array(aryty)(context, builder, ary)
    ptr = cgutils.get_item_pointer(context, builder, aryty, arr, [i], wraparound=False)
    vt = ir.VectorType(context.get_value_type(aryty.dtype), LINE // aryty.dtype.bitwidth * 8)
    return builder.bitcast(ptr, vt.as_pointer()), vt


def _splat(builder: Any, vt: Any, value: Any) -> Any:
    one = builder.insert_element(ir.Constant(vt, None), value, _I32(0))
    lanes = ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count)
    return builder.shuffle_vector(one, ir.Constant(vt, None), lanes)


def _stream(builder: Any, value: Any, ptr: Any) -> None:
    """Store the line ``value`` at ``ptr`` (line-aligned), around the cache where it may."""
    store = builder.store(value, ptr, align=LINE)
    if STREAMING:
        store.set_metadata("nontemporal", builder.module.add_metadata([_I32(1)]))


def _copy_line_codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
    srcty, dstty, _, mty = sig.args
    src, vt = _line(context, builder, srcty, args[0], args[2])
    dst, _ = _line(context, builder, dstty, args[1], args[2])
    v = builder.load(src, align=srcty.dtype.bitwidth // 8)
    _stream(builder, v, dst)
    mask = _splat(builder, vt, context.cast(builder, args[3], mty, srcty.dtype))
    hits = builder.bitcast(builder.icmp_unsigned("==", builder.and_(v, mask), mask),
                           ir.IntType(vt.count))  # fmt: skip
    popcount = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.IntType(vt.count), [ir.IntType(vt.count)]),
        f"llvm.ctpop.i{vt.count}",
    )
    return builder.zext(builder.call(popcount, [hits]), ir.IntType(64))


@intrinsic  # type: ignore[untyped-decorator]
def copy_line(typingctx: Any, src: Any, dst: Any, i: Any, exponent: Any) -> Any:
    """Copy the line of unsigned integers ``src[i:]`` to ``dst[i:]`` (``dst[i]`` line-aligned)
    and return how many of them have every bit of ``exponent`` set (inf or NaN, as floats)."""
    ok = _contiguous(src, dst) and src.dtype == dst.dtype and isinstance(src.dtype, types.Integer)
    return (types.int64(src, dst, i, exponent), _copy_line_codegen) if ok else None


def _sgd_line_codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
    wty, gty, oty, _, _ = sig.args
    w, vt = _line(context, builder, wty, args[0], args[3])
    g, _ = _line(context, builder, gty, args[1], args[3])
    out, _ = _line(context, builder, oty, args[2], args[3])
    align = wty.dtype.bitwidth // 8
    lr = _splat(builder, vt, args[4])
    # w - lr*g as the scalar kernel rounds it: no fast-math flags, so no fused multiply-add
    x = builder.fsub(builder.load(w, align=align), builder.fmul(lr, builder.load(g, align=align)))
    builder.store(x, w, align=align)
    _stream(builder, x, out)
    return context.get_dummy_value()


@intrinsic  # type: ignore[untyped-decorator]
def sgd_line(typingctx: Any, w: Any, g: Any, out: Any, i: Any, lr: Any) -> Any:
    """SGD over the line at element ``i``: ``w -= lr*g; out[:] = w`` (``out[i]`` line-aligned),
    ``out`` written around the cache. ``lr`` comes in the arrays' dtype (the scalar code would
    round a float64 ``lr`` times a float32 ``g`` in float64)."""
    same = w.dtype == g.dtype == out.dtype == lr if _contiguous(w, g, out) else False
    ok = same and isinstance(w.dtype, types.Float)
    return (types.void(w, g, out, i, lr), _sgd_line_codegen) if ok else None


def _fence_codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
    if STREAMING:
        sfence = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence"
        )
        builder.call(sfence, [])
    return context.get_dummy_value()


@intrinsic  # type: ignore[untyped-decorator]
def store_fence(typingctx: Any) -> Any:
    """Wait until this thread's streaming stores are visible to every core (``sfence``)."""
    return types.void(), _fence_codegen


@numba.njit(inline="always", nogil=True)
def stream_start(dst: npt.NDArray[Any], n: int) -> int:
    """The element of ``dst`` (``n`` long) from which whole lines are streamed: its first line
    boundary; ``n`` (nothing streamed) below :data:`STREAM_BYTES`, or where its elements are
    not aligned to their size."""
    item = dst.itemsize
    # (signed: numba takes a mix of uint64 and int64 to float64)
    addr = np.int64(dst.ctypes.data % LINE)
    if n * item < STREAM_BYTES or addr % item:
        return n
    return min(n, int((LINE - addr) % LINE) // item)


@numba.njit(cache=True, nogil=True)
def copy_count(src: npt.NDArray[Any], dst: npt.NDArray[Any], exponent: Any) -> int:
    """Copy ``src`` into ``dst`` (1-D, C-contiguous, the same unsigned integer type) and return
    how many values have every bit of ``exponent`` set: ``arrays.copy_finite`` over the bits of
    floats, the lines streamed."""
    n = src.shape[0]
    per = LINE // src.itemsize
    head = stream_start(dst, n)
    c = 0
    for i in range(head):
        b = src[i]
        dst[i] = b
        if b & exponent == exponent:
            c += 1
    i = head
    while i + per <= n:
        c += copy_line(src, dst, i, exponent)
        i += per
    for j in range(i, n):
        b = src[j]
        dst[j] = b
        if b & exponent == exponent:
            c += 1
    store_fence()
    return c


def copy(src: npt.NDArray[Any], dst: npt.NDArray[Any]) -> None:
    """``dst[...] = src`` (the same dtype and shape), streamed on two cores where both are
    C-contiguous and at least :data:`STREAM_BYTES`: a server writing a pull's values into a
    worker's reply region.

    Example:
        >>> a = np.arange(6.0); b = np.empty(6); copy(a, b); b.tolist()
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    item = src.dtype.itemsize
    if (
        src.nbytes < STREAM_BYTES
        or item not in (1, 2, 4, 8)
        or not (src.flags.c_contiguous and dst.flags.c_contiguous)
        or src.dtype != dst.dtype
        or src.shape != dst.shape
    ):
        np.copyto(dst, src)
        return
    uint = np.dtype(f"u{item}")
    # (the count of values with no bit of 0 unset is every value: not read)
    halves(copy_count, [src.reshape(-1).view(uint), dst.reshape(-1).view(uint)], uint.type(0))
