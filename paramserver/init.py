"""Initializer specs: how a table's rows get their first values.

An initializer is a small frozen description (kind plus numbers) that travels
as a msgpack-able dict (:meth:`Initializer.to_spec`). The values themselves are
computed on the servers by a counter-based hash of (table seed, key, column),
so the same key gets the same initial row on any server, at any capacity and
after any re-sharding (see ``paramserver/server/kernels/rows.py``).

Example:
    >>> from paramserver.init import Initializer, Normal
    >>> spec = Normal(std=0.02).to_spec()
    >>> spec
    {'kind': 'normal', 'mean': 0.0, 'std': 0.02}
    >>> Initializer.from_spec(spec) == Normal(std=0.02)
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from paramserver.errors import ConfigError

__all__ = ["Constant", "Initializer", "Normal", "Uniform", "Zeros"]

_T = TypeVar("_T")


def decode_spec(registry: Mapping[str, type[_T]], spec: Mapping[str, Any], what: str) -> _T:
    """Build the dataclass named by ``spec["kind"]`` from the other entries of ``spec``.

    Shared by :mod:`paramserver.optim`. Numbers may arrive as int or float (msgpack
    keeps ``1.0`` and ``1`` apart); bools are refused where a number is expected.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{what} spec: expected a mapping, got {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in registry:
        raise ConfigError(
            f"{what} spec field 'kind': expected one of {sorted(registry)}, got {kind!r}"
        )
    cls = registry[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in spec.items():
        if name == "kind":
            continue
        if name not in fields:
            raise ConfigError(
                f"{what} spec field {name!r}: not a field of {kind!r} (fields: {sorted(fields)})"
            )
        expected = fields[name].type
        if expected in ("bool", bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{what} spec field {name!r}: expected a bool, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{what} spec field {name!r}: expected a number, got {value!r}")
        else:
            value = float(value)
        kwargs[name] = value
    return cls(**kwargs)


def _check_finite(what: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} field {name!r}: expected a finite number, got {value!r}")


@dataclass(frozen=True)
class Initializer:
    """Base class of the initializers; use :class:`Zeros`, :class:`Constant`,
    :class:`Normal` or :class:`Uniform`.

    Example:
        >>> Initializer.from_spec({"kind": "uniform", "low": -0.1, "high": 0.1})
        Uniform(low=-0.1, high=0.1)
    """

    kind: ClassVar[str] = ""

    def to_spec(self) -> dict[str, Any]:
        """Return a msgpack-able dict that :meth:`from_spec` turns back into ``self``.

        Example:
            >>> Constant(0.5).to_spec()
            {'kind': 'constant', 'value': 0.5}
        """
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @staticmethod
    def from_spec(spec: Mapping[str, Any]) -> Initializer:
        """Validate ``spec`` and build the initializer; :class:`ConfigError` names the bad field.

        Example:
            >>> Initializer.from_spec({"kind": "zeros"})
            Zeros()
        """
        return decode_spec(_REGISTRY, spec, "initializer")


@dataclass(frozen=True)
class Zeros(Initializer):
    """Every value 0.

    Example:
        >>> Zeros().to_spec()
        {'kind': 'zeros'}
    """

    kind: ClassVar[str] = "zeros"


@dataclass(frozen=True)
class Constant(Initializer):
    """Every value ``value``.

    Example:
        >>> Constant(1.0).value
        1.0
    """

    kind: ClassVar[str] = "constant"
    value: float = 0.0

    def __post_init__(self) -> None:
        _check_finite("Constant", "value", self.value)


@dataclass(frozen=True)
class Normal(Initializer):
    """Gaussian values with ``mean`` and standard deviation ``std`` (the inverse CDF of hashed
    uniforms, by table; see ``paramserver/server/kernels/normal.py``).

    Example:
        >>> Normal(std=0.01).std
        0.01
    """

    kind: ClassVar[str] = "normal"
    mean: float = 0.0
    std: float = 0.01

    def __post_init__(self) -> None:
        _check_finite("Normal", "mean", self.mean)
        _check_finite("Normal", "std", self.std)
        if self.std < 0:
            raise ConfigError(f"Normal field 'std': expected >= 0, got {self.std!r}")


@dataclass(frozen=True)
class Uniform(Initializer):
    """Values uniform in ``[low, high)``.

    Example:
        >>> Uniform(-1.0, 1.0).high
        1.0
    """

    kind: ClassVar[str] = "uniform"
    low: float = -0.05
    high: float = 0.05

    def __post_init__(self) -> None:
        _check_finite("Uniform", "low", self.low)
        _check_finite("Uniform", "high", self.high)
        if not self.low < self.high:
            raise ConfigError(
                f"Uniform fields 'low', 'high': expected low < high, got {self.low!r}, {self.high!r}"
            )


_REGISTRY: dict[str, type[Initializer]] = {
    cls.kind: cls for cls in (Zeros, Constant, Normal, Uniform)
}
