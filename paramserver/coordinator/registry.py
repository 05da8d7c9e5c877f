"""The table registry: every table of the cluster, created here before on the servers.

Creating a table is idempotent by name and spec: the same spec again gets the existing one
back, a different spec under the same name is refused (``conflict``), naming the fields that
differ and their existing values. A dense table gets its ranges here, cut over the server
ranks. A cluster restored from a checkpoint starts with the checkpoint's tables, their dense
ranges cut anew for this cluster's servers.

Plain state: the loop passes the specs in and sends the answers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from paramserver import checkpoint
from paramserver.config import Limits
from paramserver.coordinator.refusal import Refusal
from paramserver.partition import dense_ranges
from paramserver.spec import TableSpec

__all__ = ["TableRegistry"]

log = logging.getLogger(__name__)


class TableRegistry:
    """The tables by name, for a cluster of servers ``server_ranks``.

    Example:
        registry = TableRegistry([0, 1])
        spec = registry.create(ps_spec.to_wire())   # the spec with its dense ranges, if dense
        registry.create(ps_spec.to_wire())          # the same spec again: the same answer
    """

    def __init__(self, server_ranks: Sequence[int], limits: Limits | None = None) -> None:
        self.server_ranks = list(server_ranks)
        self.limits = limits or Limits()
        self.tables: dict[str, TableSpec] = {}

    def specs(self) -> list[TableSpec]:
        return list(self.tables.values())

    def to_wire(self) -> list[dict[str, Any]]:
        return [s.to_wire() for s in self.tables.values()]

    def create(self, wire: dict[str, Any]) -> TableSpec:
        """Register the table of spec ``wire`` (its ranges, if any, are ignored): the spec as
        registered. ConfigError if the spec is malformed; Refusal if it conflicts."""
        spec = TableSpec.from_wire({**wire, "ranges": []} if wire.get("kind") == "dense" else wire)
        old = self.tables.get(spec.name)
        if old is not None:
            diff = old.conflicts(spec)
            if diff:
                raise Refusal(
                    "conflict",
                    f"table {spec.name!r} already exists with a different "
                    f"{', '.join(diff)} (existing: "
                    + ", ".join(f"{k}={old.definition().get(k)!r}" for k in diff)
                    + ")",
                )
            return old
        if spec.kind == "dense":
            spec = spec.with_ranges(dense_ranges(spec.name, spec.size, self.server_ranks))
            self._check_bytes(spec)
        self.tables[spec.name] = spec
        log.info(
            "table %r created (%s, %s, %s)",
            spec.name,
            spec.kind,
            spec.optimizer.to_spec()["kind"],
            spec.consistency,
        )
        return spec

    def _check_bytes(self, spec: TableSpec) -> None:
        """Refuse a dense table whose range on some server passes ``Limits(table_bytes)``."""
        opt, limit = spec.optimizer, self.limits.table_bytes
        per_element = (1 + opt.n_slots) * spec.np_dtype.itemsize
        for s, a, b in spec.ranges:
            need = (b - a) * per_element + opt.n_scalars * spec.np_dtype.itemsize
            if need > limit:
                raise Refusal(
                    "too_large",
                    f"dense table {spec.name!r} would take {need} bytes on server[{s}], more "
                    f"than Limits(table_bytes={limit}): nothing was created (use more servers, "
                    "a smaller table, or start the cluster with a larger limit)",
                )

    def restore(self, path: str) -> dict[str, Any]:
        """Take the tables of the checkpoint at ``path``: ``{"path", "clock"}`` of the
        checkpoint, as the servers get it to load their shards. ConfigError if unreadable."""
        directory, manifest, specs = checkpoint.read_manifest(path)
        for spec in specs:
            if spec.kind == "dense":
                spec = spec.with_ranges(dense_ranges(spec.name, spec.size, self.server_ranks))
            self.tables[spec.name] = spec
        clock = int(manifest["clock"])
        log.info(
            "restoring %d tables at clock %d from %s (written by %d servers, now %d)",
            len(specs),
            clock,
            directory,
            manifest["num_servers"],
            len(self.server_ranks),
        )
        return {"path": str(directory), "clock": clock}
