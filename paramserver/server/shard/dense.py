"""A server's share of a dense table: :class:`DenseShard`, a range of a flat array.

Like the sparse shard it owns the storage, applies the optimizer (the same kernels, over one
row) and validates every argument before touching state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from paramserver import nontemporal
from paramserver.errors import ConfigError
from paramserver.init import Initializer
from paramserver.optim import SGD, Optimizer
from paramserver.parallel import halves
from paramserver.server import kernels as k
from paramserver.server.shard.rule import (
    Shard,
    check_int,
    check_out,
    check_values,
    init_args,
)

__all__ = ["DenseShard"]


class DenseShard(Shard):
    """Elements ``[offset, offset+size)`` of a flat dense table, with optimizer state.

    Held as a single row ``[w | state | scalars]`` so the sparse optimizer kernels
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
        self.size = check_int("size", size, 1)
        self.offset = check_int("offset", offset, 0, 2**63 - self.size)
        super().__init__(dtype, init, optimizer, seed)
        self._width = 1 + optimizer.n_slots + optimizer.n_scalars  # per element, as exported
        stride = self.size * (1 + optimizer.n_slots) + optimizer.n_scalars
        self._data = np.empty((1, stride), self.dtype)
        self._row0 = np.zeros(1, np.int64)
        kind, p0, p1 = init_args(init)
        k.init_dense(
            self._data[0], self.size, self.offset, self._seed, kind, p0, p1, *self._rule.state
        )

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
        if out is None:
            return self._data[0, : self.size].copy()
        res = check_out(out, (self.size,), self.dtype)
        # (into a worker's reply region or a reply buffer: read next by another process)
        nontemporal.copy(self._data[0, : self.size], res)
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
        grad = check_values("grad", grad, (self.size,), self.dtype)
        if out is not None:
            out = check_out(out, (self.size,), self.dtype)
            if isinstance(self._rule.opt, SGD):
                halves(k.sgd_copy, [self._data[0, : self.size], grad, out], *self._rule.args)
                return
        self._rule.apply(self._data, self._row0, grad.reshape(1, self.size))
        if out is not None:
            nontemporal.copy(self._data[0, : self.size], out)

    def export(self, start: int = 0, stop: int | None = None) -> dict[str, npt.NDArray[Any]]:
        """``{"rows": (n, 1 + n_slots + n_scalars)}``: per element ``[w, state..., scalars...]``,
        the same layout as a sparse row of dim 1, so ranges can be re-cut on restore or moved
        (elements ``[start, stop)`` of this shard, all by default).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import Momentum
            >>> DenseShard(3, "float32", Zeros(), Momentum(), seed=0).export()["rows"].shape
            (3, 2)
        """
        stop = self.size if stop is None else stop
        if not 0 <= start <= stop <= self.size:
            raise ConfigError(f"export: [{start}, {stop}) is not within the {self.size} elements")
        planes = 1 + self._rule.opt.n_slots
        rows = np.empty((stop - start, self._width), self.dtype)
        data = self._data[0, : planes * self.size].reshape(planes, self.size)
        rows[:, :planes] = data[:, start:stop].T
        rows[:, planes:] = self._data[0, planes * self.size :]
        return {"rows": rows}

    def load_at(self, at: npt.NDArray[Any], rows: npt.NDArray[Any]) -> None:
        """Set elements ``at`` (positions in this shard) to ``rows`` as :meth:`export` gives
        them, optimizer state and scalars included (a part of a dense table moving here).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = DenseShard(4, "float32", Zeros(), SGD(), seed=0)
            >>> shard.load_at(np.array([1, 3]), np.array([[5.0], [6.0]], np.float32))
            >>> shard.pull().tolist()
            [0.0, 5.0, 0.0, 6.0]
        """
        at = np.asarray(at, np.int64)
        rows = check_values("rows", rows, (len(at), self._width), self.dtype)
        if len(at) and (at.min() < 0 or at.max() >= self.size):
            raise ConfigError(f"load_at: positions must lie within the {self.size} elements")
        planes = 1 + self._rule.opt.n_slots
        data = self._data[0, : planes * self.size].reshape(planes, self.size)
        data[:, at] = rows[:, :planes].T
        if len(at) and rows.shape[1] > planes:
            self._data[0, planes * self.size :] = rows[0, planes:]

    def assign(self, values: npt.NDArray[Any]) -> None:
        """Set the weights to ``values`` ``(size,)`` and reset the optimizer state (Adam's
        step included) to a new shard's; or, ``(size, 1 + n_slots + n_scalars)``, set weights
        and state as :meth:`export` gives them (:meth:`load`).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import Momentum
            >>> shard = DenseShard(2, "float32", Zeros(), Momentum(lr=1.0), seed=0)
            >>> shard.push(np.ones(2, np.float32))
            >>> shard.assign(np.array([5.0, 6.0], np.float32))
            >>> shard.export()["rows"].tolist()
            [[5.0, 0.0], [6.0, 0.0]]
        """
        if isinstance(values, np.ndarray) and values.ndim == 2:
            self.load(values)
            return
        values = check_values("values", values, (self.size,), self.dtype)
        row = self._data[0]
        row[: self.size] = values
        k.init_state(row, self.size, *self._rule.state)

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
        rows = check_values("rows", rows, (self.size, self._width), self.dtype)
        planes = 1 + self._rule.opt.n_slots
        scalars = rows[:, planes:]
        if scalars.shape[1] and not (scalars == scalars[:1]).all():
            raise ConfigError("rows: expected the same optimizer scalars (step) for every element")
        self._data[0, : planes * self.size] = rows[:, :planes].T.reshape(-1)
        if scalars.shape[1]:
            self._data[0, planes * self.size :] = scalars[0]
