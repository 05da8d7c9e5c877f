"""The table registry: every table of the cluster, created here before on the servers.

Creating a table is idempotent by name and spec: the same spec again gets the existing one
back, a different spec under the same name is refused (``conflict``), naming the fields that
differ and their existing values. A dense table gets its ranges here: a large one is cut over
every server, a small one lives whole on the server that holds the fewest dense elements so far
(lowest rank on a tie; with replication every table lives whole, on that server and its replicas), so that a model's many small tables spread over the servers by size. A
cluster restored from a checkpoint starts with the checkpoint's tables, their dense ranges cut
anew, in the same way, for this cluster's servers.

Plain state: the loop passes the specs in and sends the answers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from paramserver import checkpoint
from paramserver.config import Limits
from paramserver.coordinator.refusal import Refusal
from paramserver.partition import DENSE_SPLIT_ELEMENTS, dense_pieces, dense_ranges, replicas_of
from paramserver.spec import TableSpec

__all__ = ["DensePlan", "TableRegistry"]


@dataclass
class DensePlan:
    """The dense tables' placement for another set of servers (:meth:`TableRegistry.replan`):
    the specs whose ranges change, the parts that change server
    (``(source, dest, start, stop)`` per table, :func:`~paramserver.partition.dense_pieces`),
    and the dense elements on each server after."""

    ranks: list[int]
    specs: dict[str, TableSpec] = field(default_factory=dict)
    pieces: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    load: dict[int, int] = field(default_factory=dict)


log = logging.getLogger(__name__)


class TableRegistry:
    """The tables by name, for a cluster of servers ``server_ranks``.

    Example:
        registry = TableRegistry([0, 1])
        spec = registry.create(ps_spec.to_wire())   # the spec with its dense ranges, if dense
        registry.create(ps_spec.to_wire())          # the same spec again: the same answer
    """

    def __init__(
        self, server_ranks: Sequence[int], limits: Limits | None = None, replication: int = 1
    ) -> None:
        self.server_ranks = list(server_ranks)
        # copies of every range: a replicated dense table lives whole on its server and the
        # next replication - 1 ranks (partition.replicas_of), not cut
        self.replication = replication
        self.limits = limits or Limits()
        self.tables: dict[str, TableSpec] = {}
        # dense elements placed on each server so far: where the next small table goes
        self.dense_load: dict[int, int] = dict.fromkeys(self.server_ranks, 0)

    def _place(self, spec: TableSpec) -> TableSpec:
        """``spec`` with its dense ranges: a large table cut over every server, a small one
        whole on the least loaded server."""
        if (spec.size >= DENSE_SPLIT_ELEMENTS and self.replication == 1) or not self.server_ranks:
            ranges = dense_ranges(spec.name, spec.size, self.server_ranks)
        else:
            least = min(self.server_ranks, key=lambda r: (self.dense_load[r], r))
            ranges = [(least, 0, spec.size)]
        for s, a, b in ranges:
            for r in replicas_of(s, self.server_ranks, self.replication):
                self.dense_load[r] += b - a
        return spec.with_ranges(ranges)

    def replan(self, ranks: Sequence[int]) -> DensePlan:
        """Where the dense tables go if the servers become ``ranks`` (a join adds one, a drain
        takes one away); nothing changes here until :meth:`adopt`. A large table is cut anew
        over ``ranks`` (as :meth:`create` would cut it); a small one stays whole where it is,
        unless its server leaves: then it goes to the least loaded of ``ranks`` (lowest rank on
        a tie), tables in creation order; with replication every table stays whole
        (:meth:`_replan_copies`). ValueError without servers; Refusal (``too_large``) if a
        range would pass ``Limits(table_bytes)``.

        Example:
            plan = registry.replan([0, 2])    # server[1] drained
            plan.pieces["bias"]               # [(1, 0, 0, 8)]: server[1]'s part goes to server[0]
            registry.adopt(plan)
        """
        new = sorted({int(r) for r in ranks})
        if not new:
            raise ValueError("replan: no servers to place the dense tables on")
        dense = [s for s in self.tables.values() if s.kind == "dense"]
        if self.replication > 1:
            return self._replan_copies(new, dense)
        plan = DensePlan(new, load=dict.fromkeys(new, 0))
        placed: dict[str, list[tuple[int, int, int]]] = {}
        for spec in dense:  # the tables that stay or are re-cut first: they fix the load
            whole = len(spec.ranges) == 1 and spec.size < DENSE_SPLIT_ELEMENTS
            if not whole:
                placed[spec.name] = dense_ranges(spec.name, spec.size, new)
            elif spec.ranges[0][0] in plan.load:
                placed[spec.name] = [tuple(spec.ranges[0])]  # type: ignore[list-item]
            else:
                continue
            for s, a, b in placed[spec.name]:
                plan.load[s] += b - a
        for spec in dense:  # the small tables whose server leaves
            if spec.name not in placed:
                least = min(new, key=lambda r: (plan.load[r], r))
                placed[spec.name] = [(least, 0, spec.size)]
                plan.load[least] += spec.size
        for spec in dense:
            ranges = placed[spec.name]
            if [tuple(r) for r in spec.ranges] != ranges:
                moved = spec.with_ranges(ranges)
                self._check_bytes(moved)
                plan.specs[spec.name] = moved
                plan.pieces[spec.name] = dense_pieces(spec.ranges, ranges)
        return plan

    def _replan_copies(self, new: list[int], dense: list[TableSpec]) -> DensePlan:
        """:meth:`replan` with replication: every table stays whole (as placed); its owner
        stays unless it leaves, then the first of its copies that stays owns it (it holds
        the values already). A table is in the plan if its holders change (its owner's copies
        along the new ring differ), even where its ranges do not."""
        old, k = self.server_ranks, self.replication
        plan = DensePlan(new, load=dict.fromkeys(new, 0))
        for spec in dense:
            ranges: list[tuple[int, int, int]] = []
            for s, a, b in spec.ranges:
                if s not in new:
                    stay = [r for r in replicas_of(s, old, k) if r in new]
                    s = stay[0] if stay else min(new, key=lambda r: (plan.load[r], r))
                ranges.append((s, a, b))
                for r in replicas_of(s, new, k):
                    plan.load[r] += b - a
            before = [(tuple(r), replicas_of(r[0], old, k)) for r in spec.ranges]
            after = [(r, replicas_of(r[0], new, k)) for r in ranges]
            if before != after:
                moved = spec.with_ranges(ranges)
                self._check_bytes(moved)
                plan.specs[spec.name] = moved
                plan.pieces[spec.name] = dense_pieces(spec.ranges, ranges)
        return plan

    def adopt(self, plan: DensePlan) -> None:
        """Take ``plan``'s placement: its servers, the tables' new ranges, the load."""
        self.server_ranks = list(plan.ranks)
        self.tables.update(plan.specs)
        self.count_load()

    def moved(self, dense: dict[str, Any]) -> None:
        """The dense tables' ranges after a move: ``{name: [[server, start, stop], ...]}`` as
        the move's view carries them (the placement a :meth:`replan` gave)."""
        for name, ranges in dense.items():
            spec = self.tables.get(name)
            if spec is not None and spec.kind == "dense":
                self.tables[name] = spec.with_ranges([(int(s), int(a), int(b))
                                                      for s, a, b in ranges])  # fmt: skip

    def count_load(self) -> None:
        """The dense elements on each server, counted from the tables' ranges."""
        load = dict.fromkeys(self.server_ranks, 0)
        for spec in self.tables.values():
            for s, a, b in spec.ranges if spec.kind == "dense" else ():
                for r in replicas_of(s, self.server_ranks, self.replication) if s in load else ():
                    load[r] = load.get(r, 0) + b - a
        self.dense_load = load

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
            spec = self._place(spec)
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

    def load(self, wire: dict[str, Any]) -> TableSpec:
        """Take a journaled table back as it was placed (its dense ranges kept: a move may
        have placed it anew); the dense load follows."""
        spec = TableSpec.from_wire(wire)
        self.tables[spec.name] = spec
        self.count_load()
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
                spec = self._place(spec)
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
