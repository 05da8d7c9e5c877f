"""Many small dense tables in one request: ``pull_many`` and ``push_many``.

A model holds many small dense tables (each layer's weight and bias); one request per table
per step costs a round of the loop and a message each. A worker sends one ``pull_many`` and
one ``push_many`` per server and step instead (``client.dense_group``): the tables' values, or
their gradients, travel as one array, the tables' whole ranges one after the other, in the
order of the header's ``tables``.

Every table of a request is checked before any is changed (here, on this server, dense,
whole, of one dtype and one consistency, the gradient's length and finite values), so that a
bad request changes nothing. Then each table's push goes through :meth:`Pushes.on_push`, with
sequence numbers ``seq``, ``seq + 1``, ... (a resent request is skipped whole), and a pull
waits, like one table's, until the consistency allows (``DeferredPulls``; answered by
:func:`answer_pull_many`).
"""

from __future__ import annotations

import time
from typing import Any, cast

import numpy as np

from paramserver.server.consistency import pull_ready, staleness_of
from paramserver.server.push import Pushes
from paramserver.server.shard import DenseShard
from paramserver.server.state import ServerState
from paramserver.server.table import Table
from paramserver.wire.messages import PullMsg
from paramserver.wire.paths import Paths, Reply, Request
from paramserver.wire.refusal import Refusal

__all__ = ["Many", "answer_pull_many"]


def _tables(state: ServerState, h: dict[str, Any]) -> list[Table]:
    """The tables of ``h``: each here, dense, whole on this server; one dtype, one consistency."""
    tables = [state.table(name, h.get("rank")) for name in h["tables"]]
    first = tables[0].spec
    for t in tables:
        if t.spec.kind != "dense" or t.shard is None or t.start != 0 or t.stop != t.spec.size:
            raise Refusal(
                "invalid",
                f"{h['kind']}: table {t.spec.name!r} is not a dense table held whole by "
                f"{state.name}",
            )
        if t.spec.dtype != first.dtype or t.spec.consistency != first.consistency:
            raise Refusal(
                "invalid",
                f"{h['kind']}: tables {first.name!r} and {t.spec.name!r} differ in dtype or "
                "consistency; a group holds tables of one dtype and one consistency",
            )
    return tables


def answer_pull_many(state: ServerState, h: dict[str, Any], reply: Reply) -> None:
    """Answer a ``pull_many``: every table's values, one after the other, in one array."""
    tables = _tables(state, h)
    staleness = staleness_of(h["clock"], state.clocks.min_clock)
    out = np.empty(sum(t.spec.size for t in tables), tables[0].spec.np_dtype)
    at = 0
    for t in tables:
        assert isinstance(t.shard, DenseShard)
        t.shard.pull(out=out[at : at + t.spec.size])
        at += t.spec.size
        t.pulls += 1
        state.metrics.observe_staleness(t.spec.name, staleness)
    reply.send([out], staleness=staleness)


class _Acks:
    """The reply of one table's push inside a ``push_many``: its acknowledgement is the
    group's, sent once every table's push went through."""

    def ok(self, **fields: Any) -> None:
        pass

    def mirror(self) -> None:
        return None  # a group's values never travel in shared memory


class Many:
    """The ``pull_many`` and ``push_many`` handlers.

    Example:
        many = Many(state, paths, pushes, progress=server.progress)
        handlers["pull_many"], handlers["push_many"] = many.on_pull, many.on_push
    """

    def __init__(self, state: ServerState, paths: Paths, pushes: Pushes, progress: Any) -> None:
        self.state = state
        self.paths = paths
        self.pushes = pushes
        self.progress = progress

    def on_pull(self, h: dict[str, Any], req: Request) -> None:
        state = self.state
        tables = _tables(state, h)
        if h["rank"] >= len(state.clocks.clock):
            raise Refusal("invalid", f"worker rank {h['rank']} out of range")
        if state.clocks.advance(h["rank"], h["clock"]):  # see Pulls.on_pull
            self.progress()
        mode, bound = tables[0].spec.mode
        if pull_ready(mode, bound, h["clock"], state.clocks.min_clock):
            answer_pull_many(state, h, req.reply)
            return
        now = time.monotonic()
        wait = max(0.0, h["timeout"] * 0.95 - 0.05)
        # the deferred pulls know a pull by its table: the group's first names it
        kept = cast(PullMsg, {**h, "table": h["tables"][0]})
        state.deferred.add(
            (kept, req.reply, None, tables[0]), mode, bound, h["clock"], now + wait, now
        )

    def on_push(self, h: dict[str, Any], req: Request) -> None:
        tables = _tables(self.state, h)
        where = f"push_many to {len(tables)} tables from worker[{h['rank']}]"
        if len(req.arrays) != 1:
            raise Refusal("invalid", f"{where}: needs exactly one gradient array")
        grads = req.arrays[0]
        dtype = tables[0].spec.np_dtype
        total = sum(t.spec.size for t in tables)
        if grads.shape != (total,) or grads.dtype != dtype:
            raise Refusal(
                "invalid",
                f"{where}: gradient must be ({total},) {dtype}, got {tuple(grads.shape)} "
                f"{grads.dtype}",
            )
        at = 0
        parts = []
        for t in tables:
            part = grads[at : at + t.spec.size]
            at += t.spec.size
            if t.spec.nonfinite == "reject" and not np.isfinite(part).all():
                raise Refusal(
                    "non_finite",
                    f"{where} rejected: the gradient of table {t.spec.name!r} contains NaN or "
                    "Inf; no table is changed",
                )
            parts.append(part)
        for i, (t, part) in enumerate(zip(tables, parts, strict=True)):
            sub = Request(self.paths, req.identity, {}, [part])
            sub.header = {
                "kind": "push",
                "id": h["id"],
                "table": t.spec.name,
                "rank": h["rank"],
                "clock": h["clock"],
                "seq": h["seq"] + i,
            }
            sub.reply = _Acks()  # type: ignore[assignment]
            self.pushes.on_push(sub.header, sub)  # type: ignore[arg-type]
        req.reply.ok()
