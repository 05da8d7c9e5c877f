"""Optimizer specs: the update rule a server applies to the rows of a table.

An optimizer is a small frozen description (kind plus hyperparameters) that
travels as a msgpack-able dict. The servers run it (``paramserver/server/``),
with its state stored beside each row: ``n_slots`` vectors of the row's width
and ``n_scalars`` per-row numbers (Adam's step count). The learning rate can be
changed while training: ``opt.with_lr(new)``.

Math, with ``g`` the gradient of a row after summing the duplicates of a push:

- SGD: ``w -= lr*g``
- Momentum (PyTorch convention): ``v = mu*v + g``; ``w -= lr*(g + mu*v if nesterov else v)``
- Adagrad: ``acc += g*g``; ``w -= lr*g/(sqrt(acc)+eps)``
- Adam (lazy for sparse rows, step per row): bias-corrected ``m/(sqrt(v)+eps)``
- FTRL-Proximal (McMahan et al. 2013) with state ``z, n``; weights exactly 0 under L1.

Example:
    >>> from paramserver.optim import Adagrad, Optimizer
    >>> opt = Adagrad(lr=0.05)
    >>> Optimizer.from_spec(opt.to_spec()) == opt
    True
    >>> opt.with_lr(0.01).lr
    0.01
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from paramserver.errors import ConfigError
from paramserver.init import decode_spec

__all__ = ["FTRL", "SGD", "Adagrad", "Adam", "Momentum", "Optimizer"]


def _check(cls: str, name: str, value: object, *, low: float, high: float = math.inf,
           low_open: bool = False, high_open: bool = True) -> None:  # fmt: skip
    """Raise ConfigError unless ``value`` is a finite number in the given interval."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok:
        assert isinstance(value, int | float)
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}"
        raise ConfigError(
            f"{cls} field {name!r}: expected a finite number in {lo}, {hi}, got {value!r}"
        )


@dataclass(frozen=True)
class Optimizer(abc.ABC):
    """Base class of the optimizers: :class:`SGD`, :class:`Momentum`, :class:`Adagrad`,
    :class:`Adam`, :class:`FTRL`.

    Example:
        >>> Optimizer.from_spec({"kind": "sgd", "lr": 0.1})
        SGD(lr=0.1)
    """

    kind: ClassVar[str] = ""
    n_slots: ClassVar[int] = 0
    """State vectors of width ``dim`` stored beside each row."""
    n_scalars: ClassVar[int] = 0
    """Per-row state scalars (Adam's step count)."""

    @property
    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate (FTRL: ``alpha``); a subclass's ``lr`` field provides it."""

    def with_lr(self, lr: float) -> Optimizer:
        """Return a copy with learning rate ``lr`` (validated like the constructor).

        Example:
            >>> SGD(lr=0.1).with_lr(0.01)
            SGD(lr=0.01)
        """
        return dataclasses.replace(self, lr=lr)  # type: ignore[call-arg]

    def to_spec(self) -> dict[str, Any]:
        """Return a msgpack-able dict that :meth:`from_spec` turns back into ``self``.

        Example:
            >>> SGD(lr=0.5).to_spec()
            {'kind': 'sgd', 'lr': 0.5}
        """
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @staticmethod
    def from_spec(spec: Mapping[str, Any]) -> Optimizer:
        """Validate ``spec`` and build the optimizer; :class:`ConfigError` names the bad field.

        Example:
            >>> Optimizer.from_spec({"kind": "adam", "lr": 1e-3}).lr
            0.001
        """
        return decode_spec(_REGISTRY, spec, "optimizer")


@dataclass(frozen=True)
class SGD(Optimizer):
    """Plain stochastic gradient descent: ``w -= lr*g``.

    Example:
        >>> SGD(lr=0.1).n_slots
        0
    """

    kind: ClassVar[str] = "sgd"
    lr: float = 0.01

    def __post_init__(self) -> None:
        _check("SGD", "lr", self.lr, low=0.0, low_open=True)


@dataclass(frozen=True)
class Momentum(Optimizer):
    """SGD with heavy-ball or Nesterov momentum, PyTorch convention.

    ``v = momentum*v + g``; ``w -= lr*v`` (or ``lr*(g + momentum*v)`` with ``nesterov``).

    Example:
        >>> Momentum(lr=0.1, momentum=0.9, nesterov=True).n_slots
        1
    """

    kind: ClassVar[str] = "momentum"
    n_slots: ClassVar[int] = 1
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False

    def __post_init__(self) -> None:
        _check("Momentum", "lr", self.lr, low=0.0, low_open=True)
        _check("Momentum", "momentum", self.momentum, low=0.0, high=1.0)
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"Momentum field 'nesterov': expected a bool, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("Momentum field 'momentum': nesterov needs momentum > 0, got 0")


@dataclass(frozen=True)
class Adagrad(Optimizer):
    """Adagrad: ``acc += g*g``; ``w -= lr*g/(sqrt(acc)+eps)``; ``acc`` starts at ``initial_accumulator``.

    Example:
        >>> Adagrad(lr=0.05).eps
        1e-10
    """

    kind: ClassVar[str] = "adagrad"
    n_slots: ClassVar[int] = 1
    lr: float = 0.01
    eps: float = 1e-10
    initial_accumulator: float = 0.0

    def __post_init__(self) -> None:
        _check("Adagrad", "lr", self.lr, low=0.0, low_open=True)
        # eps > 0: with eps == 0 a zero gradient on a fresh row would give 0/0.
        _check("Adagrad", "eps", self.eps, low=0.0, low_open=True)
        _check("Adagrad", "initial_accumulator", self.initial_accumulator, low=0.0)


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam (Kingma & Ba), lazy for sparse rows: each row keeps its own step count.

    Example:
        >>> Adam(lr=1e-3).n_slots, Adam().n_scalars
        (2, 1)
    """

    kind: ClassVar[str] = "adam"
    n_slots: ClassVar[int] = 2
    n_scalars: ClassVar[int] = 1
    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check("Adam", "lr", self.lr, low=0.0, low_open=True)
        _check("Adam", "beta1", self.beta1, low=0.0, high=1.0)
        _check("Adam", "beta2", self.beta2, low=0.0, high=1.0)
        _check("Adam", "eps", self.eps, low=0.0, low_open=True)


@dataclass(frozen=True)
class FTRL(Optimizer):
    """FTRL-Proximal (McMahan et al., KDD 2013) with L1 and L2; ``alpha`` is the learning rate.

    Weights whose ``|z| <= l1`` are exactly 0, which makes sparse models sparse.

    Example:
        >>> FTRL(alpha=0.1, l1=1.0).with_lr(0.05).alpha
        0.05
    """

    kind: ClassVar[str] = "ftrl"
    n_slots: ClassVar[int] = 2
    alpha: float = 0.05
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0

    def __post_init__(self) -> None:
        _check("FTRL", "alpha", self.alpha, low=0.0, low_open=True)
        _check("FTRL", "beta", self.beta, low=0.0)
        _check("FTRL", "l1", self.l1, low=0.0)
        _check("FTRL", "l2", self.l2, low=0.0)
        if self.beta == 0 and self.l2 == 0:
            # The weight's denominator (beta + sqrt(n))/alpha + l2 would be 0 on a fresh row.
            raise ConfigError("FTRL fields 'beta', 'l2': expected beta > 0 or l2 > 0, got both 0")

    @property
    def lr(self) -> float:
        """FTRL's learning rate is ``alpha``."""
        return self.alpha

    def with_lr(self, lr: float) -> Optimizer:
        """Return a copy with ``alpha = lr``.

        Example:
            >>> FTRL().with_lr(0.1)
            FTRL(alpha=0.1, beta=1.0, l1=0.0, l2=0.0)
        """
        return dataclasses.replace(self, alpha=lr)


_REGISTRY: dict[str, type[Optimizer]] = {
    cls.kind: cls for cls in (SGD, Momentum, Adagrad, Adam, FTRL)
}
