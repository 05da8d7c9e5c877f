"""Rows of a sparse shard's arena: initial values, gather, scatter, repeated rows.

``data``, the arena, is ``(capacity, stride)`` in the table dtype; a row is
``[w (dim) | state 0 (dim) | state 1 (dim) | scalars]``, so one update touches one contiguous
stretch of memory. Initial rows depend only on (seed, key): :func:`init_rows` for stored rows,
:func:`gather_or_init` for rows only computed, :func:`init_dense` for a dense range. ``mark``:
``(capacity,)`` uint8 scratch per row for duplicate detection (a stamp that wraps; the caller
clears the marks when it does).
"""

from __future__ import annotations

import numpy as np

from paramserver.mix import GOLDEN, mix64
from paramserver.server.kernels.jit import (
    AHEAD,
    Array,
    Scalar,
    kernel,
    prefetch,
    prefetch_span,
)
from paramserver.server.kernels.normal import interpolated, normal_from_bits, on_table

__all__ = [
    "INIT_CONSTANT",
    "INIT_NORMAL",
    "INIT_UNIFORM",
    "INIT_ZEROS",
    "STATE_FILL",
    "STATE_FTRL",
    "STATE_ZEROS",
    "assign_rows",
    "gather",
    "gather_below",
    "gather_or_init",
    "has_duplicates",
    "init_dense",
    "init_normal_row",
    "init_row",
    "init_rows",
    "init_state",
    "row_base",
    "scatter_rows",
    "sum_duplicates",
]

_GOLDEN = GOLDEN
_S11 = np.uint64(11)
_TWO_M53 = 2.0**-53

INIT_ZEROS = 0
INIT_CONSTANT = 1
INIT_NORMAL = 2
INIT_UNIFORM = 3

STATE_ZEROS = 0
"""Optimizer state starts at 0 (SGD, Momentum, Adam)."""
STATE_FILL = 1
"""State 0 starts at a constant (Adagrad's initial accumulator)."""
STATE_FTRL = 2
"""FTRL: z chosen so that the weight formula gives back the initial weight; n = 0."""


@kernel
def row_base(seed: np.uint64, key: np.uint64) -> np.uint64:
    # Both steps are bijections, so distinct keys give distinct bases for one seed.
    return mix64(mix64(key) ^ mix64(seed + _GOLDEN))


@kernel
def init_row(row: Array, dim: int, kind: int, p0: float, p1: float, base: np.uint64) -> None:
    """Write the initial weights ``row[:dim]`` of the row whose hashed base is ``base``.

    Column j draws from counter ``2j+1``: a uniform (Uniform), or a standard normal from the
    same 53 bits (Normal, :func:`~paramserver.server.kernels.normal.normal_from_bits`), so a
    value depends on (seed, key, column) only.
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
        for j in range(dim):
            h = mix64(base + np.uint64(2 * j + 1) * _GOLDEN)
            row[j] = p0 + p1 * normal_from_bits(h >> _S11)


@kernel
def init_normal_row(
    row: Array, dim: int, p0: float, p1: float, base: np.uint64, bits: Array, vals: Array
) -> None:
    """:func:`init_row`'s Normal weights, the same values, in two passes: every column
    interpolated in a loop without a branch (it vectorizes), the bits kept in ``bits`` (``dim``
    uint64 scratch), then the few columns whose cell is at an end of the table (3% of them)
    computed exactly. One pass with the branch inside does not vectorize (see
    docs/performance.md, "Less CPU per Zipf step"). Both passes work in ``vals`` (``dim``
    float64 scratch) and ``row`` is written once, with the final values: a key repeated in
    both halves of a split request is initialized by both at once, and a half that copies
    its row into the reply must never see the other half's interpolated values."""
    for j in range(dim):
        x = mix64(base + np.uint64(2 * j + 1) * _GOLDEN) >> _S11
        bits[j] = x
        vals[j] = p0 + p1 * interpolated(x)
    for j in range(dim):
        x = bits[j]
        if not on_table(x):
            vals[j] = p0 + p1 * normal_from_bits(x)
    for j in range(dim):
        row[j] = vals[j]


@kernel
def init_state(
    row: Array, dim: int, state: int, a: Scalar, b: Scalar, c: Scalar, d: Scalar
) -> None:
    """Write the optimizer state of one row whose weights are already set.

    STATE_FILL: ``a`` is the fill value of state 0. STATE_FTRL: ``a, b, c, d`` are
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


@kernel
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
    out: Array,
) -> None:
    """Initialize the rows created for ``keys`` (those with ``rows[i] >= first``, the row count
    before :func:`lookup_or_insert` ran): weights from their keys, then state. A key repeated
    in ``keys`` initializes its row again, to the same values. ``out`` (``len(keys)`` rows, or
    none): each new row's weights also written to ``out[i]``, while they are in cache (a pull
    then gathers only the rows that existed: :func:`gather_below`)."""
    copy = out.shape[0] > 0
    bits = np.empty(dim if kind == INIT_NORMAL else 0, np.uint64)
    vals = np.empty(bits.shape[0], np.float64)
    for i in range(keys.shape[0]):
        r = rows[i]
        if r >= first:
            row = data[r]
            if kind == INIT_NORMAL:
                init_normal_row(row, dim, p0, p1, row_base(seed, keys[i]), bits, vals)
            else:
                init_row(row, dim, kind, p0, p1, row_base(seed, keys[i]))
            init_state(row, dim, state, a, b, c, d)
            if copy:
                for j in range(dim):
                    out[i, j] = row[j]


@kernel
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
        init_row(row[i : i + 1], 1, kind, p0, p1, row_base(seed, np.uint64(offset + i)))
    init_state(row, size, state, a, b, c, d)


@kernel
def gather(data: Array, rows: Array, out: Array) -> None:
    """``out[i] = data[rows[i], :dim]`` with ``dim = out.shape[1]``."""
    dim = out.shape[1]
    n = rows.shape[0]
    for i in range(n):
        if i + AHEAD < n:
            prefetch_span(data, rows[i + AHEAD], dim)
        r = rows[i]
        for j in range(dim):
            out[i, j] = data[r, j]


@kernel
def gather_below(data: Array, rows: Array, out: Array, first: int) -> None:
    """``out[i] = data[rows[i], :dim]`` where ``rows[i] < first`` (rows created from ``first``
    on were written to ``out`` by :func:`init_rows`)."""
    dim = out.shape[1]
    n = rows.shape[0]
    for i in range(n):
        if i + AHEAD < n and rows[i + AHEAD] < first:
            prefetch_span(data, rows[i + AHEAD], dim)
        r = rows[i]
        if r < first:
            for j in range(dim):
                out[i, j] = data[r, j]


@kernel
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
        if i + AHEAD < n and rows[i + AHEAD] >= 0:
            prefetch_span(data, rows[i + AHEAD], dim)
        r = rows[i]
        if r >= 0:
            for j in range(dim):
                out[i, j] = data[r, j]
        else:
            init_row(out[i], dim, kind, p0, p1, row_base(seed, keys[i]))


@kernel
def scatter_rows(data: Array, rows: Array, src: Array) -> None:
    """``data[rows[i]] = src[i]`` in order (a repeated row keeps the last)."""
    width = src.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(width):
            data[r, j] = src[i, j]


@kernel
def assign_rows(
    data: Array, rows: Array, src: Array, state: int, a: Scalar, b: Scalar, c: Scalar, d: Scalar
) -> None:
    """``data[rows[i], :dim] = src[i]`` (``dim = src.shape[1]``) in order, each row's optimizer
    state then reset as :func:`init_state` writes it for a new row (a repeated row keeps the
    last)."""
    dim = src.shape[1]
    for i in range(rows.shape[0]):
        row = data[rows[i]]
        for j in range(dim):
            row[j] = src[i, j]
        init_state(row, dim, state, a, b, c, d)


@kernel
def has_duplicates(rows: Array, mark: Array, stamp: int) -> bool:
    """Whether a row repeats in ``rows``: one random access per row into ``mark``.

    ``stamp`` must be in 1..255 and differ from every value in ``mark`` (the caller
    counts it per push and clears ``mark`` when it wraps). With uint8 marks the
    array is 1 byte a row and mostly stays in cache.
    """
    n = rows.shape[0]
    for i in range(n):
        if i + AHEAD < n:
            prefetch(mark, rows[i + AHEAD])
        r = rows[i]
        if mark[r] == stamp:
            return True
        mark[r] = stamp
    return False


@kernel
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
    cells = np.full(size, -1, np.int64)
    urows = np.empty(n, np.int64)
    ugrads = np.empty((n, dim), grads.dtype)
    u = 0
    for i in range(n):
        r = rows[i]
        h = mix64(np.uint64(r)) & mask
        while True:
            p = cells[h]
            if p < 0:
                cells[h] = u
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
