"""Table specs: what a table is, shared by client, coordinator and servers.

A spec travels as a msgpack map and is validated on every side that receives it. Two creates of
the same name are the same table only if their specs agree field by field (the placement that
the coordinator assigns is not part of that comparison).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from paramserver.config import parse_consistency
from paramserver.errors import ConfigError
from paramserver.init import Initializer, Zeros
from paramserver.optim import SGD, Optimizer
from paramserver.wire.codec import CODECS

__all__ = ["TableSpec"]

_NAME = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")
TABLE_DTYPES = ("float32", "float64")
NONFINITE = ("reject", "skip")
MAX_DIM = 1 << 16


def default_seed(name: str) -> int:
    """A seed derived from the table's name, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class TableSpec:
    """The definition of one table.

    Example:
        TableSpec(name="emb", kind="sparse", dim=16)
    """

    name: str
    kind: str
    dim: int = 1
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    init: Initializer = field(default_factory=Zeros)
    optimizer: Optimizer = field(default_factory=SGD)
    consistency: str = "async"
    seed: int | None = None
    # what a push with NaN or Inf does: "reject" it whole (nothing changes), or "skip" the
    # rows (sparse) or the gradient (dense) that hold them and apply the rest
    nonfinite: str = "reject"
    # sparse only: at most this many rows on each server; a request that would create more is
    # refused and changes nothing
    max_rows: int | None = None
    # how values travel, see paramserver.wire.codec: ``codec`` for pull replies (and pushes,
    # unless ``push_codec`` says otherwise; None: as ``codec``)
    codec: str = "none"
    push_codec: str | None = None
    # dense only, assigned by the coordinator: (server rank, start, stop) over the flat array
    ranges: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"table name must be 1-128 characters of letters, digits and _.-/, got {self.name!r}"
            )
        where = f"table {self.name!r}"
        if self.kind not in ("sparse", "dense"):
            raise ConfigError(f"{where}: kind must be 'sparse' or 'dense', got {self.kind!r}")
        if self.dtype not in TABLE_DTYPES:
            raise ConfigError(f"{where}: dtype must be one of {TABLE_DTYPES}, got {self.dtype!r}")
        if self.kind == "sparse":
            if not (isinstance(self.dim, int) and 0 < self.dim <= MAX_DIM):
                raise ConfigError(
                    f"{where}: dim must be an integer in 1..{MAX_DIM}, got {self.dim!r}"
                )
        else:
            shape = self.shape
            if not (
                isinstance(shape, tuple)
                and 0 < len(shape) <= 4
                and all(isinstance(d, int) and d > 0 for d in shape)
            ):
                raise ConfigError(f"{where}: shape must be 1 to 4 positive integers, got {shape!r}")
        if not isinstance(self.init, Initializer):
            raise ConfigError(f"{where}: init must be a ps.init initializer, got {self.init!r}")
        if not isinstance(self.optimizer, Optimizer):
            raise ConfigError(
                f"{where}: optimizer must be a ps.optim optimizer, got {self.optimizer!r}"
            )
        parse_consistency(self.consistency)
        if self.nonfinite not in NONFINITE:
            raise ConfigError(
                f"{where}: nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}"
            )
        if self.max_rows is not None:
            if self.kind != "sparse":
                raise ConfigError(f"{where}: max_rows is for sparse tables")
            if not (
                isinstance(self.max_rows, int)
                and not isinstance(self.max_rows, bool)
                and 0 < self.max_rows < 1 << 48
            ):
                raise ConfigError(
                    f"{where}: max_rows must be a positive integer, got {self.max_rows!r}"
                )
        if self.codec not in CODECS:
            raise ConfigError(f"{where}: codec must be one of {CODECS}, got {self.codec!r}")
        if self.push_codec is None:
            object.__setattr__(self, "push_codec", self.codec)
        elif self.push_codec not in CODECS:
            raise ConfigError(
                f"{where}: push_codec must be one of {CODECS} (or None: as codec), "
                f"got {self.push_codec!r}"
            )
        if self.seed is None:
            object.__setattr__(self, "seed", default_seed(self.name))
        elif not (isinstance(self.seed, int) and 0 <= self.seed < 1 << 63):
            raise ConfigError(f"{where}: seed must be an integer in 0..2**63-1, got {self.seed!r}")

    @property
    def size(self) -> int:
        """Number of elements of a dense table."""
        return math.prod(self.shape)

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    @property
    def mode(self) -> tuple[str, int]:
        return parse_consistency(self.consistency)

    def definition(self) -> dict[str, Any]:
        """Everything the user chose (what idempotent creation compares)."""
        d = self.to_wire()
        d.pop("ranges", None)
        return d

    def conflicts(self, other: TableSpec) -> list[str]:
        """Names of the fields in which two specs of the same table differ."""
        a, b = self.definition(), other.definition()
        return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))

    def with_ranges(self, ranges: list[tuple[int, int, int]]) -> TableSpec:
        return replace(self, ranges=tuple(tuple(r) for r in ranges))  # type: ignore[misc]

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "dtype": self.dtype,
            "init": self.init.to_spec(),
            "optimizer": self.optimizer.to_spec(),
            "consistency": self.consistency,
            "seed": self.seed,
            "nonfinite": self.nonfinite,
        }
        if self.max_rows is not None:
            d["max_rows"] = self.max_rows
        if self.codec != "none":  # absent means none: specs of older peers still compare
            d["codec"] = self.codec
        if self.push_codec != self.codec:  # absent means as codec
            d["push_codec"] = self.push_codec
        if self.kind == "sparse":
            d["dim"] = self.dim
        else:
            d["shape"] = list(self.shape)
            d["ranges"] = [list(r) for r in self.ranges]
        return d

    @classmethod
    def from_wire(cls, d: Any) -> TableSpec:
        """Validate and build a spec from its wire map; ConfigError names the bad field."""
        if not isinstance(d, dict):
            raise ConfigError(f"table spec must be a map, got {type(d).__name__}")
        allowed = {"name", "kind", "dtype", "init", "optimizer", "consistency", "seed", "dim"}
        allowed |= {"shape", "ranges", "nonfinite", "max_rows", "codec", "push_codec"}
        extra = set(d) - allowed
        if extra:
            raise ConfigError(f"table spec has unknown fields {sorted(extra)}")
        for key in ("name", "kind", "dtype", "init", "optimizer", "consistency", "seed"):
            if key not in d:
                raise ConfigError(f"table spec is missing {key!r}")
        kind = d["kind"]
        shape: tuple[int, ...] = ()
        ranges: tuple[tuple[int, int, int], ...] = ()
        if kind == "dense":
            if not isinstance(d.get("shape"), list):
                raise ConfigError("dense table spec needs a 'shape' list")
            shape = tuple(d["shape"])
            raw_ranges = d.get("ranges", [])
            if not isinstance(raw_ranges, list) or not all(
                isinstance(r, list)
                and len(r) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                for r in raw_ranges
            ):
                raise ConfigError(
                    "dense table spec: 'ranges' must be a list of [server, start, stop]"
                )
            ranges = tuple((r[0], r[1], r[2]) for r in raw_ranges)
        spec = cls(
            name=d["name"],
            kind=kind,
            dim=d.get("dim", 1),
            shape=shape,
            dtype=d["dtype"],
            init=Initializer.from_spec(d["init"]),
            optimizer=Optimizer.from_spec(d["optimizer"]),
            consistency=d["consistency"],
            seed=d["seed"],
            codec=d.get("codec", "none"),
            push_codec=d.get("push_codec"),
            ranges=ranges,
            nonfinite=d.get("nonfinite", "reject"),
            max_rows=d.get("max_rows"),
        )
        if kind == "dense" and ranges:
            pos = 0
            for _, start, stop in ranges:
                if start != pos or stop <= start:
                    raise ConfigError(
                        f"table {spec.name!r}: ranges {list(ranges)} do not tile the table"
                    )
                pos = stop
            if pos != spec.size:
                raise ConfigError(
                    f"table {spec.name!r}: ranges cover {pos} of {spec.size} elements"
                )
        return spec
