"""Many small dense tables pulled and pushed together: one request per server and step.

A model's dense parameters are many small tables (each layer's weight and bias). Pulled and
pushed one by one they cost one request per table and step; a :class:`DenseGroup` sends one
``pull_many`` and one ``push_many`` per server instead, the tables' values or gradients one
after the other in one array (the server's side: ``server/many.py``). A table larger than
:data:`GROUP_MAX_BYTES`, cut over several servers, or with a value codec keeps its own requests
(shared memory, the bulk channel, encoded values), inside the same call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from paramserver.client.dense import DenseTable
from paramserver.client.session import Session, server_name
from paramserver.errors import ConfigError
from paramserver.wire.transport import Future, Message, gather

__all__ = ["GROUP_MAX_BYTES", "DenseGroup"]

GROUP_MAX_BYTES = 1 << 18  # a larger table travels alone (shared memory, bulk channel)


def _plain(t: DenseTable) -> bool:
    """Whether ``t``'s values and gradients travel as they are (no value codec): a group sends
    them so; a table with a codec keeps its own requests, encoded."""
    push_codec = getattr(t.spec, "push_codec", None)  # specs without one push as they pull
    return t.spec.codec == "none" and push_codec in (None, "none")


class DenseGroup:
    """Dense tables of one consistency, pulled and pushed together.

    Example:
        group = client.dense_group([w1, b1, w2, b2])
        w1v, b1v, w2v, b2v = group.pull()
        group.push([g1, gb1, g2, gb2]).result()
    """

    def __init__(self, client: Session, tables: Sequence[DenseTable]) -> None:
        tables = list(tables)
        if not tables or not all(isinstance(t, DenseTable) for t in tables):
            raise ConfigError("dense_group: give a non-empty list of dense tables")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ConfigError(f"dense_group: a table is given twice in {names}")
        first = tables[0].spec
        for t in tables:
            if t.spec.consistency != first.consistency:
                raise ConfigError(
                    f"dense_group: tables {first.name!r} ({first.consistency}) and {t.name!r} "
                    f"({t.spec.consistency}) differ; a group holds tables of one consistency"
                )
        self.client = client
        self.tables = tables
        # (server, dtype) -> the indexes of the tables it holds whole and small; the rest go
        # alone. One request per server and dtype: float32 and float64 are not one array.
        self.by_server: dict[tuple[int, str], list[int]] = {}
        self.alone: list[int] = []
        self.placed: list[Any] = []  # the tables' ranges the plan above is for
        self._place()

    def _place(self) -> None:
        """Group the tables by server, again if a table moved (a join or a drain:
        client/ring.py)."""
        now = [t.spec.ranges for t in self.tables]
        if now == self.placed:
            return
        self.placed, self.by_server, self.alone = now, {}, []
        for i, t in enumerate(self.tables):
            ranges = t.spec.ranges
            if len(ranges) == 1 and t.spec.size * t.dtype.itemsize <= GROUP_MAX_BYTES and _plain(t):
                self.by_server.setdefault((ranges[0][0], t.spec.dtype), []).append(i)
            else:
                self.alone.append(i)

    def __len__(self) -> int:
        return len(self.tables)

    def pull_async(self, *, timeout: float | None = None) -> Future[list[np.ndarray]]:
        """Start a pull of every table; the future gets one fresh array per table, in order."""
        c = self.client
        c.check()
        limit = c.timeouts.request if timeout is None else timeout
        self._place()
        futs: list[Future[Any]] = []
        for (s, _), idx in self.by_server.items():
            group = [self.tables[i] for i in idx]
            header = self._header("pull_many", group, timeout=limit)
            futs.append(
                c.request_server(
                    s,
                    header,
                    what=f"pull of {len(group)} dense tables ({group[0].name!r}, ...) from "
                    f"{server_name(s)} ({c.endpoint.address_of(server_name(s))})",
                    parse=self._split(group),
                )
            )
        futs += [self.tables[i].pull_async(timeout=limit) for i in self.alone]

        def combine(results: list[Any]) -> list[np.ndarray]:
            out: list[np.ndarray | None] = [None] * len(self.tables)
            for idx, parts in zip(self.by_server.values(), results, strict=False):
                for i, a in zip(idx, parts, strict=True):
                    out[i] = a
            for i, a in zip(self.alone, results[len(self.by_server) :], strict=True):
                out[i] = a
            return [a for a in out if a is not None]

        what = f"pull of dense group ({self.tables[0].name!r}, ...)"
        # sent back by a source it ran ahead of (a move): asked again by the new ranges
        return gather(
            futs, what, combine, c.rerouting(futs, lambda: self.pull_async(timeout=limit))
        )

    def _header(self, kind: str, group: list[DenseTable], **fields: Any) -> dict[str, Any]:
        """A request to one server about the tables of ``group``, at this worker's clock."""
        c = self.client
        return {
            "kind": kind,
            "tables": [t.name for t in group],
            "rank": c.rank,
            "clock": c.current_clock,
            **fields,
        }

    def _split(self, group: list[DenseTable]) -> Any:
        total = sum(t.spec.size for t in group)
        dtype = group[0].dtype

        def parse(msg: Message) -> list[np.ndarray]:
            if len(msg[1]) != 1 or msg[1][0].shape != (total,) or msg[1][0].dtype != dtype:
                raise ConfigError(
                    f"pull of dense group ({group[0].name!r}, ...): the server answered "
                    f"{[a.shape for a in msg[1]]}, expected ({total},) {dtype}"
                )
            values = msg[1][0].copy()  # the frame is the transport's: one copy, then views
            staleness = int(msg[0].get("staleness") or 0)
            parts, at = [], 0
            for t in group:
                parts.append(values[at : at + t.spec.size].reshape(t.shape))
                at += t.spec.size
                t.record_staleness([staleness])
            return parts

        return parse

    def pull(self, *, timeout: float | None = None) -> list[np.ndarray]:
        """Every table's values, one fresh array per table, in the group's order.

        Example:
            w1, b1 = client.dense_group([w1_table, b1_table]).pull()
        """
        limit = self.client.timeouts.request if timeout is None else timeout
        return self.pull_async(timeout=limit).result(limit + 1.0)

    def push(self, grads: Sequence[Any]) -> Future[None]:
        """Send one gradient per table (in the group's order, each of its table's shape);
        returns at once (``.result()`` waits). A bad gradient refuses the whole push and
        nothing is sent.

        Example:
            group.push([np.ones(w.shape, np.float32) for w in group.tables]).result()
        """
        c = self.client
        c.check()
        if len(grads) != len(self.tables):
            raise ConfigError(
                f"push of dense group: {len(grads)} gradients for {len(self.tables)} tables"
            )
        checked = [t.check_grads(g, t.shape) for t, g in zip(self.tables, grads, strict=True)]
        self._place()
        futs: list[Future[Any]] = []
        for (s, _), idx in self.by_server.items():
            group = [self.tables[i] for i in idx]
            flat = np.concatenate([checked[i].reshape(-1) for i in idx])
            seq = c.next_seq()
            for _ in idx[1:]:  # the server applies table j with sequence number seq + j
                c.next_seq()
            header = self._header("push_many", group, seq=seq)
            futs.append(
                c.request_server(
                    s,
                    header,
                    [flat],
                    what=f"push to {len(group)} dense tables ({group[0].name!r}, ...) on "
                    f"{server_name(s)}",
                )
            )
        futs += [self.tables[i].push(checked[i]) for i in self.alone]
        c.endpoint.poll(0)
        return gather(futs, f"push to dense group ({self.tables[0].name!r}, ...)", lambda _: None)
