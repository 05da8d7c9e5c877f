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
- ``index``: ``(buckets, 8)`` uint64, ``buckets`` a power of two, each bucket one
  64-byte cache line: words 0-4 the keys of its 5 slots, words 5-7 their row ids + 1
  as uint32 (0 = empty, so a fresh index is ``np.zeros``). Open addressing: a key
  goes into the first free slot of its bucket, then of the next buckets (linear
  probing over buckets), so a lookup reads one cache line almost always. Every
  uint64 key is allowed (0 and 2**64-1 included): emptiness lives in the row ids.
  The keys of the rows are kept only here; :func:`keys_by_row` gives them back
  in row order. 32-bit row ids: at most :data:`INDEX_MAX_ROWS` rows.
- ``mark``: ``(capacity,)`` uint8 scratch per row for duplicate detection (a stamp
  that wraps; the caller clears the marks when it does).

Example:
    >>> import numpy as np
    >>> from paramserver.server import kernels as k
    >>> index = k.new_index(2)
    >>> rows = np.empty(3, np.int64)
    >>> k.lookup_or_insert(index, 0, 4, np.array([5, 9, 5], np.uint64), rows, 0)
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

from paramserver.mix import GOLDEN, mix64

__all__ = [
    "BUCKET_SLOTS",
    "INDEX_MAX_ROWS",
    "INIT_CONSTANT",
    "INIT_NORMAL",
    "INIT_UNIFORM",
    "INIT_ZEROS",
    "STATE_FILL",
    "STATE_FTRL",
    "STATE_ZEROS",
    "adagrad_rows",
    "adam_rows",
    "ftrl_rows",
    "gather",
    "gather_or_init",
    "has_duplicates",
    "init_dense",
    "init_rows",
    "keys_by_row",
    "lookup",
    "lookup_or_insert",
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
_RING = 32  # > _AHEAD: hashes of the keys between the one probed and the one prefetched


_GOLDEN = GOLDEN
_S11 = np.uint64(11)
_M32 = np.uint64(0xFFFF_FFFF)
_S32 = np.uint64(32)
_Z64 = np.uint64(0)
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


BUCKET_SLOTS = 5  # _probe reads the 5 slots without a loop
"""Keys a bucket of the index holds: 5 keys (40 bytes) and their 5 row ids (uint32, 20
bytes) fill one 64-byte cache line."""
_ROW_WORD = 5  # the row ids of slots 2j, 2j+1 are the low, high half of word 5+j
INDEX_MAX_ROWS = (1 << 32) - 1
"""Rows an index can address (row id + 1 is a uint32)."""


def new_index(buckets: int) -> Array:
    """Return an empty hash index of ``buckets`` buckets (a power of two), each 64 bytes on a
    64-byte boundary, so that a bucket is one cache line.

    Example:
        >>> new_index(4).shape
        (4, 8)
    """
    assert buckets > 0 and buckets & (buckets - 1) == 0, buckets
    # zeros: all slots empty, and the pages are mapped as the index fills
    raw = np.zeros((buckets + 1) * 8, np.uint64)
    skip = (-raw.ctypes.data % 64) // 8
    return raw[skip : skip + buckets * 8].reshape(buckets, 8)


# ----------------------------------------------------------------------------- hashing


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
def _slot_row(index: Array, b: np.uint64, s: int) -> np.uint64:
    """Row id + 1 held by slot ``s`` of bucket ``b`` (0: empty)."""
    w: np.uint64 = index[b, _ROW_WORD + (s >> 1)]
    return (w >> np.uint64(32 * (s & 1))) & _M32


@_kernel
def _set_slot(index: Array, b: np.uint64, s: int, key: np.uint64, v: np.uint64) -> None:
    index[b, s] = key
    index[b, _ROW_WORD + (s >> 1)] |= v << np.uint64(32 * (s & 1))


@_kernel
def _probe(index: Array, key: np.uint64, h: np.uint64) -> tuple[np.uint64, int, np.uint64]:
    """Where ``key`` (hash ``h``) is, or the first empty slot of its probe sequence, where it
    would go: ``(bucket, slot, row id + 1 or 0)`` (the slot only when the key is absent).

    Slots fill in probe order and are never emptied, so a bucket with an empty
    slot ends the search, and its first empty slot follows its filled ones. A key
    is in at most one slot and an empty slot's row is 0, so OR-ing the rows of the
    slots whose key matches gives the row without a branch per slot (a branch on
    where in the bucket a key sits mispredicts every other lookup).
    """
    mask = np.uint64(index.shape[0] - 1)
    b = h & mask
    while True:
        w5 = index[b, 5]
        w6 = index[b, 6]
        r0, r1 = w5 & _M32, w5 >> _S32
        r2, r3 = w6 & _M32, w6 >> _S32
        r4 = index[b, 7] & _M32
        v = (
            (r0 if index[b, 0] == key else _Z64)
            | (r1 if index[b, 1] == key else _Z64)
            | (r2 if index[b, 2] == key else _Z64)
            | (r3 if index[b, 3] == key else _Z64)
            | (r4 if index[b, 4] == key else _Z64)
        )
        if v != 0:
            return b, 0, v
        if r4 == 0:
            return b, int(r0 != 0) + int(r1 != 0) + int(r2 != 0) + int(r3 != 0), _Z64
        b = (b + np.uint64(1)) & mask


@_kernel
def _hash_ahead(index: Array, keys: Array, i: int, ring: Array) -> None:
    """Hash ``keys[i]`` into ``ring`` and prefetch its bucket: the lookups hash each key once,
    :data:`_AHEAD` keys before they probe it."""
    h = mix64(keys[i])
    ring[i % _RING] = h
    _prefetch2(index, h & np.uint64(index.shape[0] - 1), 0)


@_kernel
def lookup(index: Array, keys: Array, rows: Array) -> int:
    """Write the row of each key into ``rows`` (-1 where absent); return how many were absent."""
    missing = 0
    n = keys.shape[0]
    ring = np.empty(_RING, np.uint64)
    for i in range(min(n, _AHEAD)):
        _hash_ahead(index, keys, i, ring)
    for i in range(n):
        if i + _AHEAD < n:
            _hash_ahead(index, keys, i + _AHEAD, ring)
        _, _, v = _probe(index, keys[i], ring[i % _RING])
        if v == 0:
            rows[i] = -1
            missing += 1
        else:
            rows[i] = np.int64(v) - 1
    return missing


@_kernel
def lookup_or_insert(
    index: Array, n_rows: int, max_rows: int, keys: Array, rows: Array, start: int
) -> tuple[int, int]:
    """Find or append the row of each of ``keys[start:]``, writing row ids into ``rows``.

    New rows get ids ``n_rows, n_rows+1, ...``, so the rows created are exactly
    the range from the old to the new row count (:func:`init_rows` finds them in
    ``rows``). Stops early, before the insert that would make the row count
    exceed ``max_rows`` (at most :data:`INDEX_MAX_ROWS`); the caller grows the
    arrays and calls again from the returned position. Returns ``(position
    reached, new row count)``.
    """
    n = keys.shape[0]
    ring = np.empty(_RING, np.uint64)
    for i in range(start, min(n, start + _AHEAD)):
        _hash_ahead(index, keys, i, ring)
    for i in range(start, n):
        if i + _AHEAD < n:
            _hash_ahead(index, keys, i + _AHEAD, ring)
        k = keys[i]
        b, s, v = _probe(index, k, ring[i % _RING])
        if v == 0:
            if n_rows >= max_rows:
                return i, n_rows
            _set_slot(index, b, s, k, np.uint64(n_rows + 1))
            rows[i] = n_rows
            n_rows += 1
        else:
            rows[i] = np.int64(v) - 1
    return n, n_rows


@_kernel
def rehash(index: Array, old: Array) -> None:
    """Move every entry of index ``old`` into the empty ``index`` (used when the index grows)."""
    for ob in range(old.shape[0]):
        for os in range(BUCKET_SLOTS):
            v = _slot_row(old, np.uint64(ob), os)
            if v != 0:
                k = old[ob, os]
                b, s, _ = _probe(index, k, mix64(k))
                _set_slot(index, b, s, k, v)


@_kernel
def keys_by_row(index: Array, out: Array) -> None:
    """``out[r]`` = the key of row ``r`` for every row in the index (``out`` holds them all)."""
    for b in range(index.shape[0]):
        for s in range(BUCKET_SLOTS):
            v = _slot_row(index, np.uint64(b), s)
            if v != 0:
                out[np.int64(v) - 1] = index[b, s]


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
