"""A server's share of a table: :class:`SparseShard` (keyed rows) and :class:`DenseShard` (a range).

The shards own the storage and apply the optimizer; they know nothing of
sockets, clocks or consistency (the event loop decides *when* to call
:meth:`~SparseShard.push`). Every method validates its arguments before
touching state, so a bad request raises :class:`~paramserver.errors.ConfigError`
and leaves the shard as it was. The work itself happens in the compiled
kernels of :mod:`paramserver.server.kernels`.

Example:
    >>> import numpy as np
    >>> from paramserver.init import Normal
    >>> from paramserver.optim import Adagrad
    >>> shard = SparseShard(dim=4, dtype="float32", init=Normal(std=0.01),
    ...                     optimizer=Adagrad(lr=0.1), seed=7)
    >>> keys = np.array([7, 42, 7], dtype=np.uint64)
    >>> shard.pull(keys).shape
    (3, 4)
    >>> shard.push(keys, np.ones((3, 4), np.float32))
    >>> shard.num_rows
    2
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from paramserver.arrays import check_keys
from paramserver.errors import ConfigError
from paramserver.init import Constant, Initializer, Normal, Uniform, Zeros
from paramserver.optim import FTRL, SGD, Adagrad, Adam, Momentum, Optimizer
from paramserver.parallel import halves
from paramserver.server import kernels as k

__all__ = ["DenseShard", "SparseShard"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_KEY_DTYPE = np.dtype(np.uint64)


def _check_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"dtype: expected float32 or float64, got {dtype!r}") from e
    if dt not in _DTYPES:
        raise ConfigError(f"dtype: expected float32 or float64, got {dt}")
    return dt


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name}: expected an int, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ConfigError(f"{name}: expected {bound}, got {v}")
    return v


def _init_args(init: Initializer) -> tuple[int, float, float]:
    """The (kind, p0, p1) triple the init kernels take."""
    if isinstance(init, Zeros):
        return k.INIT_ZEROS, 0.0, 0.0
    if isinstance(init, Constant):
        return k.INIT_CONSTANT, float(init.value), 0.0
    if isinstance(init, Normal):
        return k.INIT_NORMAL, float(init.mean), float(init.std)
    if isinstance(init, Uniform):
        return k.INIT_UNIFORM, float(init.low), float(init.high)
    raise ConfigError(f"init: expected an Initializer, got {init!r}")


class _Rule:
    """An optimizer bound to a dtype: hyperparameters converted once, kernel chosen once."""

    def __init__(self, opt: Optimizer, dtype: np.dtype[Any]) -> None:
        if not isinstance(opt, Optimizer) or type(opt) is Optimizer:
            raise ConfigError(f"optimizer: expected an Optimizer, got {opt!r}")
        t = dtype.type
        self.opt = opt
        z = t(0)
        # Initial state: (mode, a, b, c, d) for kernels._init_state.
        self.state: tuple[int, Any, Any, Any, Any] = (k.STATE_ZEROS, z, z, z, z)
        self.args: tuple[Any, ...]
        if isinstance(opt, SGD):
            self.kernel: Any = k.sgd_rows
            self.args = (t(opt.lr),)
        elif isinstance(opt, Momentum):
            self.kernel = k.momentum_rows
            self.args = (t(opt.lr), t(opt.momentum), bool(opt.nesterov))
        elif isinstance(opt, Adagrad):
            self.kernel = k.adagrad_rows
            self.args = (t(opt.lr), t(opt.eps))
            self.state = (k.STATE_FILL, t(opt.initial_accumulator), z, z, z)
        elif isinstance(opt, Adam):
            self.kernel = k.adam_rows
            self.args = (t(opt.lr), t(opt.beta1), t(opt.beta2), t(opt.eps), t(1))
        elif isinstance(opt, FTRL):
            self.kernel = k.ftrl_rows
            self.args = (t(opt.alpha), t(opt.beta), t(opt.l1), t(opt.l2), z)
            self.state = (k.STATE_FTRL, t(opt.alpha), t(opt.beta), t(opt.l1), t(opt.l2))
        else:
            raise ConfigError(f"optimizer: unsupported kind {opt.kind!r}")

    def apply(
        self, data: npt.NDArray[Any], rows: npt.NDArray[Any], grads: npt.NDArray[Any]
    ) -> None:
        self.kernel(data, rows, grads, *self.args)


def _replace_rule(current: _Rule, optimizer: Optimizer, dtype: np.dtype[Any]) -> _Rule:
    if not isinstance(optimizer, Optimizer) or type(optimizer) is not type(current.opt):
        raise ConfigError(
            f"optimizer: expected the same kind as the table's ({current.opt.kind!r}), "
            f"got {getattr(optimizer, 'kind', optimizer)!r}"
        )
    return _Rule(optimizer, dtype)


def _check_seed(seed: object) -> np.uint64:
    return np.uint64(_check_int("seed", seed, 0, 2**64))


def _check_values(
    name: str, a: object, shape: tuple[int, ...], dtype: np.dtype[Any]
) -> npt.NDArray[Any]:
    if not isinstance(a, np.ndarray):
        raise ConfigError(
            f"{name}: expected a {dtype} array of shape {shape}, got {type(a).__name__}"
        )
    if a.dtype != dtype or a.shape != shape:
        raise ConfigError(
            f"{name}: expected a {dtype} array of shape {shape}, got {a.dtype} array of shape {a.shape}"
        )
    return np.ascontiguousarray(a)


def _check_out(out: object, shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    if out is None:
        return np.empty(shape, dtype)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != dtype
        or out.shape != shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        got = (
            f"{out.dtype} array of shape {out.shape} (C-contiguous: {out.flags.c_contiguous}, "
            f"writeable: {out.flags.writeable})"
            if isinstance(out, np.ndarray)
            else type(out).__name__
        )
        raise ConfigError(
            f"out: expected a writeable C-contiguous {dtype} array of shape {shape}, got {got}"
        )
    return out


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


_BUCKET_ROWS = 4
"""Rows an index holds per bucket before it doubles: 80% of the slots, so that a lookup
rarely reads past its own bucket (one cache line)."""


class SparseShard:
    """Rows of width ``dim`` keyed by uint64, created on first touch, updated by an optimizer.

    Storage: one growable arena of rows ``[w | optimizer slots | per-row scalars]``
    (doubling when full), an open-addressing hash index of 64-byte buckets of 5
    keys and their uint32 row ids (at most 4 rows a bucket on average, doubling by
    rehash) that is also the only record of the rows' keys, and a byte per row for
    duplicate detection. At most ``2**32 - 1`` rows. Initial rows depend only on
    (seed, key).

    Example:
        >>> from paramserver.init import Zeros
        >>> from paramserver.optim import SGD
        >>> shard = SparseShard(2, "float32", Zeros(), SGD(lr=1.0), seed=0)
        >>> keys = np.array([3, 3], np.uint64)
        >>> shard.push(keys, np.ones((2, 2), np.float32))  # summed: one update of -2
        >>> shard.pull(np.array([3], np.uint64)).tolist()
        [[-2.0, -2.0]]
    """

    def __init__(
        self,
        dim: int,
        dtype: npt.DTypeLike,
        init: Initializer,
        optimizer: Optimizer,
        seed: int,
        capacity: int = 1024,
    ) -> None:
        self.dim = _check_int("dim", dim, 1)
        self.dtype = _check_dtype(dtype)
        if not isinstance(init, Initializer):
            raise ConfigError(f"init: expected an Initializer, got {init!r}")
        self.init = init
        self._init_args = _init_args(init)
        self._rule = _Rule(optimizer, self.dtype)
        self._seed = _check_seed(seed)
        self.seed = int(self._seed)
        capacity = _check_int("capacity", capacity, 1)
        self.stride = self.dim * (1 + optimizer.n_slots) + optimizer.n_scalars
        self._data = np.empty((capacity, self.stride), self.dtype)
        self._mark = np.zeros(capacity, np.uint8)
        self._index = k.new_index(_pow2_at_least(-(-capacity // _BUCKET_ROWS)))
        self._n = 0
        self._stamp = 0

    # ------------------------------------------------------------------ properties

    @property
    def optimizer(self) -> Optimizer:
        """The optimizer currently applied by :meth:`push`."""
        return self._rule.opt

    @property
    def num_rows(self) -> int:
        """How many rows are stored."""
        return self._n

    @property
    def capacity(self) -> int:
        """Rows the arena holds before it doubles."""
        return int(self._data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes allocated: arena, duplicate marks and hash index."""
        return int(self._data.nbytes + self._mark.nbytes + self._index.nbytes)

    # ------------------------------------------------------------------ public operations

    def pull(
        self,
        keys: npt.NDArray[np.uint64],
        *,
        create: bool = True,
        out: npt.NDArray[Any] | None = None,
    ) -> npt.NDArray[Any]:
        """Return the weights of ``keys`` as ``(len(keys), dim)``; keys may repeat.

        Missing rows are created by the initializer (``create=True``), or only
        computed, not stored (``create=False``). ``out`` receives the rows if given.

        Example:
            >>> from paramserver.init import Constant
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(2, "float64", Constant(0.5), SGD(), seed=1)
            >>> shard.pull(np.array([9], np.uint64), create=False).tolist(), shard.num_rows
            ([[0.5, 0.5]], 0)
        """
        keys = check_keys(keys, "shard")
        res = _check_out(out, (keys.shape[0], self.dim), self.dtype)
        if create:
            rows = self._find_or_create(keys)
            k.gather(self._data, rows, res)
        else:
            rows = np.empty(keys.shape[0], np.int64)
            k.lookup(self._index, keys, rows)
            kind, p0, p1 = self._init_args
            k.gather_or_init(self._data, rows, keys, res, self._seed, kind, p0, p1)
        return res

    def push(self, keys: npt.NDArray[np.uint64], grads: npt.NDArray[Any]) -> None:
        """Apply gradients ``grads`` ``(len(keys), dim)``: duplicates summed in order, then
        one optimizer update per distinct key; missing rows are created first.

        NaN and inf are not checked here (the caller decides, see :func:`paramserver.arrays.all_finite`).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Zeros(), SGD(lr=0.5), seed=0)
            >>> shard.push(np.array([1], np.uint64), np.array([[2.0]], np.float32))
            >>> shard.pull(np.array([1], np.uint64)).tolist()
            [[-1.0]]
        """
        keys = check_keys(keys, "shard")
        grads = _check_values("grads", grads, (keys.shape[0], self.dim), self.dtype)
        if keys.shape[0] == 0:
            return
        rows = self._find_or_create(keys)
        if k.has_duplicates(rows, self._mark, self._next_stamp()):
            rows, grads = k.sum_duplicates(rows, grads)
        self._rule.apply(self._data, rows, grads)

    def resolve(self, keys: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.int64], bool]:
        """Row ids of ``keys`` (rows created as a pull would), and whether any repeats: what a
        server keeps for a cached key list, so later requests skip the hash lookup.

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Zeros(), SGD(), seed=0)
            >>> rows, dup = shard.resolve(np.array([4, 9], np.uint64))
            >>> rows.tolist(), dup
            ([0, 1], False)
        """
        keys = check_keys(keys, "shard")
        rows = self._find_or_create(keys)
        return rows, bool(k.has_duplicates(rows, self._mark, self._next_stamp()))

    def pull_rows(
        self, rows: npt.NDArray[np.int64], out: npt.NDArray[Any] | None = None
    ) -> npt.NDArray[Any]:
        """Weights of rows given by :meth:`resolve` (no lookup).

        Example:
            >>> from paramserver.init import Constant
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Constant(2.0), SGD(), seed=0)
            >>> rows, _ = shard.resolve(np.array([4], np.uint64))
            >>> shard.pull_rows(rows).tolist()
            [[2.0]]
        """
        res = _check_out(out, (rows.shape[0], self.dim), self.dtype)
        k.gather(self._data, rows, res)
        return res

    def push_rows(
        self, rows: npt.NDArray[np.int64], grads: npt.NDArray[Any], duplicates: bool
    ) -> None:
        """:meth:`push` to rows given by :meth:`resolve` (no lookup).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Zeros(), SGD(lr=1.0), seed=0)
            >>> rows, dup = shard.resolve(np.array([4], np.uint64))
            >>> shard.push_rows(rows, np.ones((1, 1), np.float32), dup)
            >>> shard.pull_rows(rows).tolist()
            [[-1.0]]
        """
        grads = _check_values("grads", grads, (rows.shape[0], self.dim), self.dtype)
        if duplicates:
            rows, grads = k.sum_duplicates(rows, grads)
        self._rule.apply(self._data, rows, grads)

    def set_optimizer(self, optimizer: Optimizer) -> None:
        """Replace the hyperparameters (same optimizer kind only; the state is kept).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Zeros(), SGD(lr=0.5), seed=0)
            >>> shard.set_optimizer(shard.optimizer.with_lr(0.1))
            >>> shard.optimizer.lr
            0.1
        """
        self._rule = _replace_rule(self._rule, optimizer, self.dtype)

    def contains(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """Which of ``keys`` have a stored row.

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = SparseShard(1, "float32", Zeros(), SGD(), seed=0)
            >>> _ = shard.pull(np.array([5], np.uint64))
            >>> shard.contains(np.array([5, 6], np.uint64)).tolist()
            [True, False]
        """
        keys = check_keys(keys, "shard")
        rows = np.empty(keys.shape[0], np.int64)
        k.lookup(self._index, keys, rows)
        return rows >= 0

    def export(self) -> dict[str, npt.NDArray[Any]]:
        """Copies of all rows in insertion order: ``keys`` (n,) uint64 and ``rows`` (n, stride),
        each row ``[w | optimizer slots | scalars]``.

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import Adagrad
            >>> shard = SparseShard(2, "float32", Zeros(), Adagrad(), seed=0)
            >>> _ = shard.pull(np.array([8], np.uint64))
            >>> shard.export()["rows"].shape
            (1, 4)
        """
        keys = np.empty(self._n, np.uint64)
        k.keys_by_row(self._index, keys)
        return {"keys": keys, "rows": self._data[: self._n].copy()}

    def load(self, keys: npt.NDArray[np.uint64], rows: npt.NDArray[Any]) -> None:
        """Store full rows (as :meth:`export` gives them) under ``keys``, replacing existing ones.

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> a = SparseShard(2, "float32", Zeros(), SGD(), seed=0)
            >>> a.push(np.array([4], np.uint64), np.ones((1, 2), np.float32))
            >>> b = SparseShard(2, "float32", Zeros(), SGD(), seed=0)
            >>> b.load(**a.export())
            >>> b.pull(np.array([4], np.uint64)).tolist()
            [[-0.009999999776482582, -0.009999999776482582]]
        """
        keys = check_keys(keys, "shard")
        rows = _check_values("rows", rows, (keys.shape[0], self.stride), self.dtype)
        if keys.shape[0] == 0:
            return
        ids = self._find_or_create(keys, initialize=False)
        k.scatter_rows(self._data, ids, rows)

    # ------------------------------------------------------------------ storage

    def _next_stamp(self) -> int:
        """A stamp for :func:`~paramserver.server.kernels.has_duplicates`: 1..255, the marks
        cleared when it wraps (one memset of a byte a row every 255 calls)."""
        if self._stamp == 255:
            self._mark.fill(0)
            self._stamp = 0
        self._stamp += 1
        return self._stamp

    def _find_or_create(
        self, keys: npt.NDArray[np.uint64], *, initialize: bool = True
    ) -> npt.NDArray[np.int64]:
        """Row ids of ``keys``, appending (and initializing) rows for the missing ones."""
        if self._n + keys.shape[0] > k.INDEX_MAX_ROWS:
            new = int(np.count_nonzero(~self.contains(np.unique(keys))))
            if self._n + new > k.INDEX_MAX_ROWS:
                raise ConfigError(
                    f"keys: {new} new rows would take this shard past the "
                    f"{k.INDEX_MAX_ROWS} rows it can hold (it has {self._n}); nothing was "
                    "changed (spread the table over more servers)"
                )
        rows = np.empty(keys.shape[0], np.int64)
        n0 = self._n
        pos = 0
        while True:
            max_rows = min(self._data.shape[0], _BUCKET_ROWS * self._index.shape[0])
            pos, self._n = k.lookup_or_insert(self._index, self._n, max_rows, keys, rows, pos)
            if pos == keys.shape[0]:
                break
            self._grow()
        if initialize and self._n > n0:
            kind, p0, p1 = self._init_args
            k.init_rows(
                self._data, keys, rows, n0, self.dim, self._seed, kind, p0, p1, *self._rule.state
            )
        return rows

    def _grow(self) -> None:
        """Double whichever of the arena and the index is full."""
        n = self._n
        if n >= self._data.shape[0]:
            cap = 2 * self._data.shape[0]
            data = np.empty((cap, self.stride), self.dtype)
            data[:n] = self._data[:n]
            self._data = data
            # fresh marks: zeros never equal a stamp, so the stamp count goes on
            self._mark = np.zeros(cap, np.uint8)
        if n >= _BUCKET_ROWS * self._index.shape[0]:
            index = k.new_index(2 * self._index.shape[0])
            k.rehash(index, self._index)
            self._index = index


class DenseShard:
    """Elements ``[offset, offset+size)`` of a flat dense table, with optimizer state.

    Held as a single row ``[w | slots | scalars]`` so the sparse optimizer kernels
    apply unchanged; ``w`` is one contiguous stretch, so a pull is one memcpy.
    Element ``i`` starts at the value a sparse row of key ``offset+i`` has in column
    0, so the table's values do not depend on how it is cut into shards.

    Example:
        >>> from paramserver.init import Uniform
        >>> from paramserver.optim import Adam
        >>> whole = DenseShard(10, "float32", Uniform(), Adam(), seed=3)
        >>> part = DenseShard(4, "float32", Uniform(), Adam(), seed=3, offset=6)
        >>> bool((whole.pull()[6:] == part.pull()).all())
        True
    """

    def __init__(
        self,
        size: int,
        dtype: npt.DTypeLike,
        init: Initializer,
        optimizer: Optimizer,
        seed: int,
        offset: int = 0,
    ) -> None:
        self.size = _check_int("size", size, 1)
        self.offset = _check_int("offset", offset, 0, 2**63 - self.size)
        self.dtype = _check_dtype(dtype)
        if not isinstance(init, Initializer):
            raise ConfigError(f"init: expected an Initializer, got {init!r}")
        self.init = init
        self._rule = _Rule(optimizer, self.dtype)
        self._seed = _check_seed(seed)
        self.seed = int(self._seed)
        self._width = 1 + optimizer.n_slots + optimizer.n_scalars  # per element, as exported
        stride = self.size * (1 + optimizer.n_slots) + optimizer.n_scalars
        self._data = np.empty((1, stride), self.dtype)
        self._row0 = np.zeros(1, np.int64)
        kind, p0, p1 = _init_args(init)
        k.init_dense(
            self._data[0], self.size, self.offset, self._seed, kind, p0, p1, *self._rule.state
        )

    @property
    def optimizer(self) -> Optimizer:
        """The optimizer currently applied by :meth:`push`."""
        return self._rule.opt

    @property
    def num_rows(self) -> int:
        """The number of elements (``size``)."""
        return self.size

    @property
    def weights(self) -> npt.NDArray[Any]:
        """The live weights ``(size,)``, read-only (a view: valid until the next push).

        Example:
            >>> from paramserver.init import Constant
            >>> from paramserver.optim import SGD
            >>> DenseShard(2, "float32", Constant(1.0), SGD(), seed=0).weights.tolist()
            [1.0, 1.0]
        """
        w = self._data[0, : self.size]
        w.flags.writeable = False
        return w

    @property
    def nbytes(self) -> int:
        """Bytes allocated for weights and optimizer state."""
        return int(self._data.nbytes)

    def pull(self, out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
        """Return a copy of the weights, ``(size,)`` (written into ``out`` if given).

        Example:
            >>> from paramserver.init import Constant
            >>> from paramserver.optim import SGD
            >>> DenseShard(3, "float64", Constant(2.0), SGD(), seed=0).pull().tolist()
            [2.0, 2.0, 2.0]
        """
        res = _check_out(out, (self.size,), self.dtype)
        np.copyto(res, self._data[0, : self.size])
        return res

    def push(self, grad: npt.NDArray[Any], out: npt.NDArray[Any] | None = None) -> None:
        """Apply one optimizer update with gradient ``grad`` ``(size,)`` in the table dtype;
        with ``out``, also write the new weights there (for SGD in the same pass).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = DenseShard(2, "float32", Zeros(), SGD(lr=1.0), seed=0)
            >>> shard.push(np.array([1.0, -1.0], np.float32))
            >>> shard.pull().tolist()
            [-1.0, 1.0]
        """
        grad = _check_values("grad", grad, (self.size,), self.dtype)
        if out is not None:
            out = _check_out(out, (self.size,), self.dtype)
            if isinstance(self._rule.opt, SGD):
                halves(k.sgd_copy, [self._data[0, : self.size], grad, out], *self._rule.args)
                return
        self._rule.apply(self._data, self._row0, grad.reshape(1, self.size))
        if out is not None:
            np.copyto(out, self._data[0, : self.size])

    def set_optimizer(self, optimizer: Optimizer) -> None:
        """Replace the hyperparameters (same optimizer kind only; the state is kept).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import Adam
            >>> shard = DenseShard(2, "float32", Zeros(), Adam(), seed=0)
            >>> shard.set_optimizer(Adam(lr=1e-4))
        """
        self._rule = _replace_rule(self._rule, optimizer, self.dtype)

    def export(self) -> dict[str, npt.NDArray[Any]]:
        """``{"rows": (size, 1 + n_slots + n_scalars)}``: per element ``[w, slots..., scalars...]``,
        the same layout as a sparse row of dim 1, so ranges can be re-cut on restore.

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import Momentum
            >>> DenseShard(3, "float32", Zeros(), Momentum(), seed=0).export()["rows"].shape
            (3, 2)
        """
        planes = 1 + self._rule.opt.n_slots
        rows = np.empty((self.size, self._width), self.dtype)
        rows[:, :planes] = self._data[0, : planes * self.size].reshape(planes, self.size).T
        rows[:, planes:] = self._data[0, planes * self.size :]
        return {"rows": rows}

    def load(self, rows: npt.NDArray[Any]) -> None:
        """Inverse of :meth:`export`. The per-element scalars (Adam's step) must agree.

        Example:
            >>> from paramserver.init import Normal
            >>> from paramserver.optim import SGD
            >>> a = DenseShard(3, "float32", Normal(), SGD(), seed=1)
            >>> b = DenseShard(3, "float32", Normal(), SGD(), seed=2)
            >>> b.load(**a.export())
            >>> bool((a.pull() == b.pull()).all())
            True
        """
        rows = _check_values("rows", rows, (self.size, self._width), self.dtype)
        planes = 1 + self._rule.opt.n_slots
        scalars = rows[:, planes:]
        if scalars.shape[1] and not (scalars == scalars[:1]).all():
            raise ConfigError("rows: expected the same optimizer scalars (step) for every element")
        self._data[0, : planes * self.size] = rows[:, :planes].T.reshape(-1)
        if scalars.shape[1]:
            self._data[0, planes * self.size :] = scalars[0]
