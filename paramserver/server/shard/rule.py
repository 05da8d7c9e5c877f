"""What both shards share: their common base (:class:`Shard`: dtype, initializer, seed, the
optimizer), the optimizer and the initializer as the kernels take them (:class:`UpdateRule`,
:func:`init_args`), and the checks of their arguments (each raises
:class:`~paramserver.errors.ConfigError` before anything changes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from paramserver.errors import ConfigError
from paramserver.init import Constant, Initializer, Normal, Uniform, Zeros
from paramserver.optim import FTRL, SGD, Adagrad, Adam, Momentum, Optimizer
from paramserver.server import kernels as k

__all__ = [
    "Shard",
    "UpdateRule",
    "check_dtype",
    "check_int",
    "check_out",
    "check_seed",
    "check_values",
    "init_args",
    "replace_rule",
]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"dtype: expected float32 or float64, got {dtype!r}") from e
    if dt not in _DTYPES:
        raise ConfigError(f"dtype: expected float32 or float64, got {dt}")
    return dt


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name}: expected an int, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ConfigError(f"{name}: expected {bound}, got {v}")
    return v


def init_args(init: Initializer) -> tuple[int, float, float]:
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


class UpdateRule:
    """An optimizer bound to a dtype: hyperparameters converted once, kernel chosen once."""

    def __init__(self, opt: Optimizer, dtype: np.dtype[Any]) -> None:
        if not isinstance(opt, Optimizer) or type(opt) is Optimizer:
            raise ConfigError(f"optimizer: expected an Optimizer, got {opt!r}")
        t = dtype.type
        self.opt = opt
        z = t(0)
        # Initial state: (mode, a, b, c, d) for kernels.init_rows / init_dense.
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


def replace_rule(current: UpdateRule, optimizer: Optimizer, dtype: np.dtype[Any]) -> UpdateRule:
    if not isinstance(optimizer, Optimizer) or type(optimizer) is not type(current.opt):
        raise ConfigError(
            f"optimizer: expected the same kind as the table's ({current.opt.kind!r}), "
            f"got {getattr(optimizer, 'kind', optimizer)!r}"
        )
    return UpdateRule(optimizer, dtype)


def check_seed(seed: object) -> np.uint64:
    return np.uint64(check_int("seed", seed, 0, 2**64))


def check_values(
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


def check_out(out: object, shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
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


class Shard:
    """What a sparse and a dense shard both hold beside their storage, checked once: the
    table dtype, the initializer, the seed and the optimizer (as an :class:`UpdateRule`)."""

    def __init__(
        self, dtype: npt.DTypeLike, init: Initializer, optimizer: Optimizer, seed: int
    ) -> None:
        self.dtype = check_dtype(dtype)
        if not isinstance(init, Initializer):
            raise ConfigError(f"init: expected an Initializer, got {init!r}")
        self.init = init
        self._rule = UpdateRule(optimizer, self.dtype)
        self._seed = check_seed(seed)
        self.seed = int(self._seed)

    @property
    def optimizer(self) -> Optimizer:
        """The optimizer currently applied by ``push``."""
        return self._rule.opt

    def set_optimizer(self, optimizer: Optimizer) -> None:
        """Replace the hyperparameters (same optimizer kind only; the state is kept).

        Example:
            >>> from paramserver.init import Zeros
            >>> from paramserver.optim import SGD
            >>> shard = Shard("float32", Zeros(), SGD(lr=0.5), seed=0)
            >>> shard.set_optimizer(shard.optimizer.with_lr(0.1))
            >>> shard.optimizer.lr
            0.1
        """
        self._rule = replace_rule(self._rule, optimizer, self.dtype)
