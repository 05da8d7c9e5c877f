"""Compiled kernels behind the shards: hash index, row arena, init, gather, optimizer updates.

Every kernel is a numba function over whole arrays (``nogil`` so that a server
may run one beside its socket threads; no ``fastmath`` so that float32
arithmetic rounds exactly like NumPy's). The Python side
(``paramserver/server/shard.py``) validates arguments, grows arrays and picks
kernels; nothing here loops in Python per key or per row.

Storage the kernels assume:

- ``data``: the arena, ``(capacity, stride)`` in the table dtype; a row is
  ``[w (dim) | slot 0 (dim) | slot 1 (dim) | scalars]``, so one update touches
  one contiguous stretch of memory.
- ``index``: a pair of arrays of ``size`` slots, ``size`` a power of two, open
  addressing with linear probing: ``index_keys`` (uint64) the key of a slot and
  ``index_rows`` the row id + 1, 0 for an empty slot (so a fresh index is
  ``np.zeros``: pages the kernel maps lazily). Row ids are uint32 while the index
  has at most 2**32 slots (rows <= 2**31), uint64 beyond: 12 bytes a slot instead
  of 16. Every uint64 key is allowed (0 and 2**64-1 included): emptiness lives in
  the row array. The keys of the rows are kept only here; :func:`keys_by_row`
  gives them back in row order.
- ``mark``: ``(capacity,)`` uint8 scratch per row for duplicate detection (a stamp
  that wraps; the caller clears the marks when it does).

Example:
    >>> import numpy as np
    >>> from paramserver.server import kernels as k
    >>> index_keys, index_rows = k.new_index(8)
    >>> rows = np.empty(3, np.int64)
    >>> k.lookup_or_insert(index_keys, index_rows, 0, 4, np.array([5, 9, 5], np.uint64), rows, 0)
    (3, 2)
    >>> rows.tolist()
    [0, 1, 0]
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
    "INDEX_U32_SLOTS",
    "INIT_CONSTANT",
    "INIT_NORMAL",
    "INIT_UNIFORM",
    "INIT_ZEROS",
    "STATE_FILL",
    "STATE_FTRL",
    "STATE_ZEROS",
    "adagrad_rows",
    "adam_rows",
    "count_nonfinite",
    "ftrl_rows",
    "gather",
    "gather_or_init",
    "has_duplicates",
    "init_dense",
    "init_rows",
    "keys_by_row",
    "lookup",
    "lookup_or_insert",
    "mix64",
    "momentum_rows",
    "new_index",
    "rehash",
    "scatter_rows",
    "sgd_copy",
    "sgd_rows",
    "sum_duplicates",
]

Array = npt.NDArray[Any]
Scalar = np.floating[Any]
_F = TypeVar("_F", bound=Callable[..., Any])
# numba's extension API is partly annotated; seen through Any, the code generators type-check.
cgutils: Any = _cgutils
intrinsic: Any = _intrinsic


def _kernel(fn: _F) -> _F:
    # boundscheck off and fastmath off are numba's defaults; spelled out because both matter.
    # error_model="numpy": IEEE division (x/0 -> inf) instead of a ZeroDivisionError check,
    # a branch that kept the division loops from vectorizing (Adagrad 5x slower).
    return cast(
        _F,
        numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=False, error_model="numpy")(
            fn
        ),
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
def _prefetch(typingctx: Any, arr: Any, i: Any) -> Any:
    """Hint the CPU to fetch ``arr[i]``: random row accesses overlap instead of queueing.

    Without it, the long dependency chains of sqrt and division fill the
    out-of-order window and the misses run one after another (Adagrad on 1M
    rows: 5 M rows/s without, 24 M rows/s with).
    """
    return types.void(arr, i), _prefetch_codegen


@intrinsic  # type: ignore[untyped-decorator]
def _prefetch2(typingctx: Any, arr: Any, i: Any, j: Any) -> Any:
    """:func:`_prefetch` of ``arr[i, j]``."""
    return types.void(arr, i, j), _prefetch_codegen


_AHEAD = 16
"""How many keys ahead the kernels prefetch."""


_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)
_M1 = np.uint64(0xBF58_476D_1CE4_E5B9)
_M2 = np.uint64(0x94D0_49BB_1331_11EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_TWO_M53 = 2.0**-53
_TWO_PI = 2.0 * np.pi

INIT_ZEROS = 0
INIT_CONSTANT = 1
INIT_NORMAL = 2
INIT_UNIFORM = 3

STATE_ZEROS = 0
"""Optimizer state starts at 0 (SGD, Momentum, Adam)."""
STATE_FILL = 1
"""Slot 0 starts at a constant (Adagrad's initial accumulator)."""
STATE_FTRL = 2
"""FTRL: z chosen so that the weight formula gives back the initial weight; n = 0."""


INDEX_U32_SLOTS = 1 << 32
"""Largest index (in slots) whose row ids are uint32: it holds at most half as many rows,
so row id + 1 <= 2**31 fits. Larger indexes use uint64 row ids."""


def new_index(size: int) -> tuple[Array, Array]:
    """Return an empty hash index with ``size`` slots (a power of two): ``(keys, rows)``.

    Example:
        >>> keys, rows = new_index(4)
        >>> keys.shape, rows.dtype.name
        ((4,), 'uint32')
    """
    assert size > 0 and size & (size - 1) == 0, size
    row_dtype = np.uint32 if size <= INDEX_U32_SLOTS else np.uint64
    # Keys are read only where the row says the slot is used: no need to clear them.
    return np.empty(size, np.uint64), np.zeros(size, row_dtype)


# ----------------------------------------------------------------------------- hashing


@_kernel
def mix64(z: np.uint64) -> np.uint64:
    """splitmix64's finalizer: a bijection of uint64 with full avalanche.

    Example:
        >>> int(mix64(np.uint64(1))) != 1
        True
    """
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@_kernel
def _row_base(seed: np.uint64, key: np.uint64) -> np.uint64:
    # Both steps are bijections, so distinct keys give distinct bases for one seed.
    return mix64(mix64(key) ^ mix64(seed + _GOLDEN))


@_kernel
def _init_row(row: Array, dim: int, kind: int, p0: float, p1: float, base: np.uint64) -> None:
    """Write the initial weights ``row[:dim]`` of the row whose hashed base is ``base``.

    Column j draws from counters ``2j+1`` (Uniform) or, for the pair of columns
    ``2p, 2p+1``, counters ``4p+1, 4p+2`` (Box-Muller's two uniforms give two normals).
    """
    if kind == INIT_ZEROS:
        for j in range(dim):
            row[j] = 0.0
    elif kind == INIT_CONSTANT:
        for j in range(dim):
            row[j] = p0
    elif kind == INIT_UNIFORM:
        width = p1 - p0
        for j in range(dim):
            h = mix64(base + np.uint64(2 * j + 1) * _GOLDEN)
            row[j] = p0 + width * (float(h >> _S11) * _TWO_M53)
    else:
        for p in range((dim + 1) // 2):
            h1 = mix64(base + np.uint64(4 * p + 1) * _GOLDEN)
            h2 = mix64(base + np.uint64(4 * p + 2) * _GOLDEN)
            u1 = (float(h1 >> _S11) + 1.0) * _TWO_M53  # (0, 1]: log is finite
            theta = _TWO_PI * (float(h2 >> _S11) * _TWO_M53)
            radius = p1 * np.sqrt(-2.0 * np.log(u1))
            row[2 * p] = p0 + radius * np.cos(theta)
            if 2 * p + 1 < dim:
                row[2 * p + 1] = p0 + radius * np.sin(theta)


@_kernel
def _init_state(
    row: Array, dim: int, state: int, a: Scalar, b: Scalar, c: Scalar, d: Scalar
) -> None:
    """Write the optimizer state of one row whose weights are already set.

    STATE_FILL: ``a`` is the fill value of slot 0. STATE_FTRL: ``a, b, c, d`` are
    ``alpha, beta, l1, l2`` in the table dtype.
    """
    for j in range(dim, row.shape[0]):
        row[j] = 0
    if state == STATE_FILL:
        for j in range(dim):
            row[dim + j] = a
    elif state == STATE_FTRL:
        for j in range(dim):
            w = row[j]
            row[dim + j] = -w * (b / a + d) - np.sign(w) * c


@_kernel
def init_rows(
    data: Array,
    keys: Array,
    rows: Array,
    first: int,
    dim: int,
    seed: np.uint64,
    kind: int,
    p0: float,
    p1: float,
    state: int,
    a: Scalar,
    b: Scalar,
    c: Scalar,
    d: Scalar,
) -> None:
    """Initialize the rows created for ``keys`` (those with ``rows[i] >= first``, the row count
    before :func:`lookup_or_insert` ran): weights from their keys, then state. A key repeated
    in ``keys`` initializes its row again, to the same values."""
    for i in range(keys.shape[0]):
        r = rows[i]
        if r >= first:
            row = data[r]
            _init_row(row, dim, kind, p0, p1, _row_base(seed, keys[i]))
            _init_state(row, dim, state, a, b, c, d)


@_kernel
def init_dense(
    row: Array,
    size: int,
    offset: int,
    seed: np.uint64,
    kind: int,
    p0: float,
    p1: float,
    state: int,
    a: Scalar,
    b: Scalar,
    c: Scalar,
    d: Scalar,
) -> None:
    """Initialize a dense shard held as one row: element i is column 0 of key ``offset+i``."""
    for i in range(size):
        _init_row(row[i : i + 1], 1, kind, p0, p1, _row_base(seed, np.uint64(offset + i)))
    _init_state(row, size, state, a, b, c, d)


@_kernel
def _prefetch_span(data: Array, r: int, width: int) -> None:
    """Prefetch the cache lines of ``data[r, :width]``."""
    step = max(1, 64 // data.itemsize)
    for off in range(0, width, step):
        _prefetch2(data, r, off)
    _prefetch2(data, r, width - 1)


# ----------------------------------------------------------------------------- index


@_kernel
def lookup(index_keys: Array, index_rows: Array, keys: Array, rows: Array) -> int:
    """Write the row of each key into ``rows`` (-1 where absent); return how many were absent."""
    mask = np.uint64(index_keys.shape[0] - 1)
    missing = 0
    n = keys.shape[0]
    for i in range(n):
        if i + _AHEAD < n:
            ahead = mix64(keys[i + _AHEAD]) & mask
            _prefetch(index_rows, ahead)
            _prefetch(index_keys, ahead)
        k = keys[i]
        h = mix64(k) & mask
        while True:
            r = index_rows[h]
            if r == 0:
                rows[i] = -1
                missing += 1
                break
            if index_keys[h] == k:
                rows[i] = np.int64(r) - 1
                break
            h = (h + np.uint64(1)) & mask
    return missing


@_kernel
def lookup_or_insert(
    index_keys: Array,
    index_rows: Array,
    n_rows: int,
    max_rows: int,
    keys: Array,
    rows: Array,
    start: int,
) -> tuple[int, int]:
    """Find or append the row of each of ``keys[start:]``, writing row ids into ``rows``.

    New rows get ids ``n_rows, n_rows+1, ...``, so the rows created are exactly
    the range from the old to the new row count (:func:`init_rows` finds them in
    ``rows``). Stops early, before the insert that would make the row count
    exceed ``max_rows``; the caller grows the arrays and calls again from the
    returned position. Returns ``(position reached, new row count)``.
    """
    mask = np.uint64(index_keys.shape[0] - 1)
    n = keys.shape[0]
    for i in range(start, n):
        if i + _AHEAD < n:
            ahead = mix64(keys[i + _AHEAD]) & mask
            _prefetch(index_rows, ahead)
            _prefetch(index_keys, ahead)
        k = keys[i]
        h = mix64(k) & mask
        while True:
            r = index_rows[h]
            if r == 0:
                if n_rows >= max_rows:
                    return i, n_rows
                index_keys[h] = k
                index_rows[h] = n_rows + 1
                rows[i] = n_rows
                n_rows += 1
                break
            if index_keys[h] == k:
                rows[i] = np.int64(r) - 1
                break
            h = (h + np.uint64(1)) & mask
    return n, n_rows


@_kernel
def rehash(index_keys: Array, index_rows: Array, old_keys: Array, old_rows: Array) -> None:
    """Move every entry of the old index into the empty new one (used when the index grows)."""
    mask = np.uint64(index_keys.shape[0] - 1)
    for s in range(old_rows.shape[0]):
        r = old_rows[s]
        if r == 0:
            continue
        k = old_keys[s]
        h = mix64(k) & mask
        while index_rows[h] != 0:
            h = (h + np.uint64(1)) & mask
        index_keys[h] = k
        index_rows[h] = r


@_kernel
def keys_by_row(index_keys: Array, index_rows: Array, out: Array) -> None:
    """``out[r]`` = the key of row ``r`` for every row in the index (``out`` holds them all)."""
    for s in range(index_rows.shape[0]):
        r = index_rows[s]
        if r != 0:
            out[np.int64(r) - 1] = index_keys[s]


# ----------------------------------------------------------------------------- rows


@_kernel
def gather(data: Array, rows: Array, out: Array) -> None:
    """``out[i] = data[rows[i], :dim]`` with ``dim = out.shape[1]``."""
    dim = out.shape[1]
    n = rows.shape[0]
    for i in range(n):
        if i + _AHEAD < n:
            _prefetch_span(data, rows[i + _AHEAD], dim)
        r = rows[i]
        for j in range(dim):
            out[i, j] = data[r, j]


@_kernel
def gather_or_init(
    data: Array,
    rows: Array,
    keys: Array,
    out: Array,
    seed: np.uint64,
    kind: int,
    p0: float,
    p1: float,
) -> None:
    """Like :func:`gather`, but where ``rows[i] < 0`` write the initial row of ``keys[i]``."""
    dim = out.shape[1]
    n = rows.shape[0]
    for i in range(n):
        if i + _AHEAD < n and rows[i + _AHEAD] >= 0:
            _prefetch_span(data, rows[i + _AHEAD], dim)
        r = rows[i]
        if r >= 0:
            for j in range(dim):
                out[i, j] = data[r, j]
        else:
            _init_row(out[i], dim, kind, p0, p1, _row_base(seed, keys[i]))


@_kernel
def scatter_rows(data: Array, rows: Array, src: Array) -> None:
    """``data[rows[i]] = src[i]`` in order (a repeated row keeps the last)."""
    width = src.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(width):
            data[r, j] = src[i, j]


@_kernel
def has_duplicates(rows: Array, mark: Array, stamp: int) -> bool:
    """Whether a row repeats in ``rows``: one random access per row into ``mark``.

    ``stamp`` must be in 1..255 and differ from every value in ``mark`` (the caller
    counts it per push and clears ``mark`` when it wraps). With uint8 marks the
    array is 1 byte a row and mostly stays in cache.
    """
    n = rows.shape[0]
    for i in range(n):
        if i + _AHEAD < n:
            _prefetch(mark, rows[i + _AHEAD])
        r = rows[i]
        if mark[r] == stamp:
            return True
        mark[r] = stamp
    return False


@_kernel
def sum_duplicates(rows: Array, grads: Array) -> tuple[Array, Array]:
    """Return the distinct rows in order of first occurrence and their summed gradients.

    Sums run in order of occurrence (``(g1 + g2) + g3``). Positions are found
    through a hash table local to the call (load <= 0.5), so no per-row state
    of the table is needed.
    """
    n = rows.shape[0]
    dim = grads.shape[1]
    size = 2
    while size < 2 * n:
        size *= 2
    mask = np.uint64(size - 1)
    slots = np.full(size, -1, np.int64)
    urows = np.empty(n, np.int64)
    ugrads = np.empty((n, dim), grads.dtype)
    u = 0
    for i in range(n):
        r = rows[i]
        h = mix64(np.uint64(r)) & mask
        while True:
            p = slots[h]
            if p < 0:
                slots[h] = u
                urows[u] = r
                for j in range(dim):
                    ugrads[u, j] = grads[i, j]
                u += 1
                break
            if urows[p] == r:
                for j in range(dim):
                    ugrads[p, j] += grads[i, j]
                break
            h = (h + np.uint64(1)) & mask
    return urows[:u], ugrads[:u]


@_kernel
def count_nonfinite(bits: Array, exponent: Any) -> int:
    """How many of the floats whose raw bits are ``bits`` are inf or NaN (exponent all ones).

    Integer compares on the bit pattern vectorize without fastmath.
    """
    c = 0
    for i in range(bits.shape[0]):
        if bits[i] & exponent == exponent:
            c += 1
    return c


# ----------------------------------------------------------------------------- optimizers
# One kernel per optimizer over distinct rows; scalars come in the table dtype so that
# every operation rounds in that dtype. The dense shard calls them with one row.
# The inner loops work on separate views (w, slots, g): indexing one row array at
# offsets j and dim+j keeps LLVM from proving the loop free of dependences, and then
# it does not vectorize (dense Adagrad 1.5 -> 8.8 GB/s with the views).


@_kernel
def sgd_rows(data: Array, rows: Array, grads: Array, lr: Scalar) -> None:
    """SGD: ``w -= lr*g``."""
    dim = grads.shape[1]
    n = rows.shape[0]
    stride = data.shape[1]
    for i in range(n):
        if i + _AHEAD < n:
            _prefetch_span(data, rows[i + _AHEAD], stride)
        w = data[rows[i], :dim]
        g = grads[i]
        for j in range(dim):
            w[j] = w[j] - lr * g[j]


@_kernel
def momentum_rows(
    data: Array, rows: Array, grads: Array, lr: Scalar, mu: Scalar, nesterov: bool
) -> None:
    """Momentum (PyTorch): ``v = mu*v + g``; ``w -= lr*(g + mu*v if nesterov else v)``."""
    dim = grads.shape[1]
    n = rows.shape[0]
    stride = data.shape[1]
    for i in range(n):
        if i + _AHEAD < n:
            _prefetch_span(data, rows[i + _AHEAD], stride)
        row = data[rows[i]]
        w = row[:dim]
        vel = row[dim : 2 * dim]
        g = grads[i]
        if nesterov:
            for j in range(dim):
                v = mu * vel[j] + g[j]
                vel[j] = v
                w[j] = w[j] - lr * (g[j] + mu * v)
        else:
            for j in range(dim):
                v = mu * vel[j] + g[j]
                vel[j] = v
                w[j] = w[j] - lr * v


@_kernel
def adagrad_rows(data: Array, rows: Array, grads: Array, lr: Scalar, eps: Scalar) -> None:
    """Adagrad: ``acc += g*g``; ``w -= lr*g/(sqrt(acc)+eps)``."""
    dim = grads.shape[1]
    n = rows.shape[0]
    stride = data.shape[1]
    for i in range(n):
        if i + _AHEAD < n:
            _prefetch_span(data, rows[i + _AHEAD], stride)
        row = data[rows[i]]
        w = row[:dim]
        acc = row[dim : 2 * dim]
        g = grads[i]
        for j in range(dim):
            a = acc[j] + g[j] * g[j]
            acc[j] = a
            w[j] = w[j] - lr * g[j] / (np.sqrt(a) + eps)


@_kernel
def adam_rows(
    data: Array,
    rows: Array,
    grads: Array,
    lr: Scalar,
    b1: Scalar,
    b2: Scalar,
    eps: Scalar,
    one: Scalar,
) -> None:
    """Lazy Adam: the step count ``t`` is the row's last element, counted per row."""
    dim = grads.shape[1]
    n = rows.shape[0]
    stride = data.shape[1]
    c1 = one - b1
    c2 = one - b2
    for i in range(n):
        if i + _AHEAD < n:
            _prefetch_span(data, rows[i + _AHEAD], stride)
        row = data[rows[i]]
        t = row[3 * dim] + one
        row[3 * dim] = t
        bc1 = one - b1**t
        bc2 = one - b2**t
        w = row[:dim]
        mom = row[dim : 2 * dim]
        vel = row[2 * dim : 3 * dim]
        g = grads[i]
        for j in range(dim):
            m = b1 * mom[j] + c1 * g[j]
            v = b2 * vel[j] + c2 * g[j] * g[j]
            mom[j] = m
            vel[j] = v
            w[j] = w[j] - lr * (m / bc1) / (np.sqrt(v / bc2) + eps)


@_kernel
def ftrl_rows(
    data: Array,
    rows: Array,
    grads: Array,
    alpha: Scalar,
    beta: Scalar,
    l1: Scalar,
    l2: Scalar,
    zero: Scalar,
) -> None:
    """FTRL-Proximal (McMahan 2013) with slot 0 = z and slot 1 = n; w is recomputed."""
    dim = grads.shape[1]
    n = rows.shape[0]
    stride = data.shape[1]
    for i in range(n):
        if i + _AHEAD < n:
            _prefetch_span(data, rows[i + _AHEAD], stride)
        row = data[rows[i]]
        w = row[:dim]
        zs = row[dim : 2 * dim]
        ns = row[2 * dim : 3 * dim]
        g = grads[i]
        for j in range(dim):
            gj = g[j]
            n_old = ns[j]
            n_new = n_old + gj * gj
            sigma = (np.sqrt(n_new) - np.sqrt(n_old)) / alpha
            z = zs[j] + (gj - sigma * w[j])
            zs[j] = z
            ns[j] = n_new
            if np.abs(z) <= l1:
                w[j] = zero
            else:
                w[j] = -(z - np.sign(z) * l1) / ((beta + np.sqrt(n_new)) / alpha + l2)


@_kernel
def sgd_copy(w: Array, g: Array, out: Array, lr: Scalar) -> None:
    """Dense SGD fused with the copy out: ``w -= lr*g; out[:] = w`` in one pass over memory
    (the same-host push that refreshes the worker's reply buffer)."""
    for j in range(w.shape[0]):
        x = w[j] - lr * g[j]
        w[j] = x
        out[j] = x


@_kernel
def gather_slots(data: Array, rows: Array, out: Array) -> None:
    """``out[i] = data[rows[i], :dim]`` without prefetch hints (rows already sorted)."""
    dim = out.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(dim):
            out[i, j] = data[r, j]
