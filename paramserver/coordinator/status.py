"""Status aggregation: what the servers' stats and the members' heartbeats add up to.

A :class:`StatusBoard` keeps the newest ``stats`` answer of each server (rows, bytes, pull
and push counts, latency and staleness histograms) and the rates of the counters that grow,
and builds the one plain map that ``paramserver status``, ``--json`` and the Prometheus
exporter read (its fields are documented in :mod:`paramserver.metrics`). A stats answer of
the wrong shape is ignored with a warning, never fatal.

Plain state: the loop feeds it (see :mod:`paramserver.coordinator.collector`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from paramserver.coordinator.membership import Member
from paramserver.metrics import LATENCY_BUCKETS, STALENESS_BUCKETS, Rate
from paramserver.spec import TableSpec

__all__ = ["StatusBoard", "sane_stats"]

log = logging.getLogger(__name__)


def _is_hist(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], list)
        and all(isinstance(c, int) for c in v[0])
        and isinstance(v[1], int | float)
    )


def sane_stats(st: Any) -> bool:
    """A server's stats answer has the shape the status reads (a bad one is ignored, not fatal).

    Example:
        sane_stats({"tables": {}, "metrics": {"latency": {}, "staleness": {}}})  # True
    """
    if not isinstance(st, dict) or not isinstance(st.get("tables"), dict):
        return False
    if not all(isinstance(t, dict) for t in st["tables"].values()):
        return False
    m = st.get("metrics", {})
    return (
        isinstance(m, dict)
        and isinstance(m.get("latency", {}), dict)
        and isinstance(m.get("staleness", {}), dict)
        and all(
            _is_hist(h) for h in (*m.get("latency", {}).values(), *m.get("staleness", {}).values())
        )
    )


class StatusBoard:
    """The servers' newest stats and the rates of every counter, since ``started``.

    Example:
        board = StatusBoard(now=0.0)
        board.record_stats(0, {"tables": {"emb": {"rows": 5, "pulls": 10}}}, now=1.0)
        board.status(now=2.0, address="tcp://h:1", epoch=3, servers=servers, workers=workers,
                     tables=specs, last_checkpoint=None)["tables"][0]["servers"][0]["rows"]  # 5
    """

    def __init__(self, now: float) -> None:
        self.started = now
        self._examples_rate: dict[int, Rate] = {}
        self._server_stats: dict[int, tuple[float, dict[str, Any]]] = {}
        self._server_rates: dict[tuple[int, str, str], Rate] = {}

    def record_examples(self, rank: int, now: float, examples: int) -> None:
        """Worker ``rank`` reported ``examples`` trained in all (its heartbeat)."""
        self._examples_rate.setdefault(rank, Rate()).add(now, examples)

    def record_stats(self, rank: int, stats: Any, now: float) -> bool:
        """Server ``rank`` answered ``stats``: kept if it has the right shape (else False)."""
        if not sane_stats(stats):
            log.warning("server[%d] answered stats the coordinator cannot read", rank)
            return False
        self._server_stats[rank] = (now, stats)
        for table, t in stats["tables"].items():
            if isinstance(t, dict):
                for what in ("pulls", "pushes"):
                    rate = self._server_rates.setdefault((rank, table, what), Rate())
                    rate.add(now, float(t.get(what, 0)))
        return True

    def _rate(self, rank: int, table: str, what: str) -> float:
        rate = self._server_rates.get((rank, table, what))
        return rate.per_second() if rate is not None else 0.0

    def _node(self, m: Member, now: float) -> dict[str, Any]:
        node: dict[str, Any] = {
            "role": m.role,
            "rank": m.rank,
            "state": m.state,
            "address": m.address,
            "host": m.host,
            "pid": m.pid,
            "last_heartbeat": round(now - m.last_seen, 3) if m.last_seen else None,
            "clock": m.clock,
        }
        if m.role == "worker":
            rate = self._examples_rate.get(m.rank)
            node["examples"] = m.examples
            node["examples_per_s"] = rate.per_second() if rate is not None else 0.0
        return node

    def _table(self, spec: TableSpec) -> dict[str, Any]:
        per = []
        for rank, (_, st) in sorted(self._server_stats.items()):
            t = st["tables"].get(spec.name)
            if isinstance(t, dict):
                per.append(
                    {
                        "rank": rank,
                        "rows": int(t.get("rows", 0)),
                        "bytes": int(t.get("bytes", 0)),
                        "pulls": int(t.get("pulls", 0)),
                        "pushes": int(t.get("pushes", 0)),
                        "pulls_per_s": self._rate(rank, spec.name, "pulls"),
                        "pushes_per_s": self._rate(rank, spec.name, "pushes"),
                    }
                )
        return {
            "name": spec.name,
            "kind": spec.kind,
            "consistency": spec.consistency,
            "optimizer": str(spec.optimizer.to_spec()["kind"]),
            "servers": per,
        }

    def _servers(
        self, now: float, servers: Sequence[Member]
    ) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
        """Per server its traffic and clocks; and the staleness histograms summed over them."""
        out: list[dict[str, Any]] = []
        staleness: dict[str, list[Any]] = {}
        for rank, (seen, st) in sorted(self._server_stats.items()):
            clocks = [c for c in st.get("clocks", []) if isinstance(c, int)]
            metrics: dict[str, Any] = st.get("metrics") or {}
            tabs = st["tables"].values()
            out.append(
                {
                    "rank": rank,
                    "age": round(now - seen, 3),
                    "min_clock": servers[rank].clock if rank < len(servers) else 0,
                    "clocks": clocks,
                    "deferred": st.get("deferred", 0),
                    "pulls_per_s": sum(self._rate(rank, n, "pulls") for n in st["tables"]),
                    "pushes_per_s": sum(self._rate(rank, n, "pushes") for n in st["tables"]),
                    "pulls": sum(int(t.get("pulls", 0)) for t in tabs if isinstance(t, dict)),
                    "pushes": sum(int(t.get("pushes", 0)) for t in tabs if isinstance(t, dict)),
                    "latency": metrics.get("latency") or {},
                }
            )
            for name, hist in (metrics.get("staleness") or {}).items():
                counts, total = hist
                old = staleness.get(name)
                if old is None:
                    staleness[name] = [list(counts), float(total)]
                else:
                    old[0] = [a + b for a, b in zip(old[0], counts, strict=False)]
                    old[1] += float(total)
        return out, staleness

    def status(
        self,
        *,
        now: float,
        address: str,
        epoch: int,
        servers: Sequence[Member],
        workers: Sequence[Member],
        tables: Iterable[TableSpec],
        last_checkpoint: tuple[float, str] | None,
    ) -> dict[str, Any]:
        """The cluster's state as one plain map: nodes, workers' clocks and examples/s, tables
        per server, servers' traffic, staleness, the last checkpoint (wall time, directory)."""
        per_server, staleness = self._servers(now, servers)
        ck = None
        if last_checkpoint is not None:
            ck = {"path": last_checkpoint[1], "age": time.time() - last_checkpoint[0]}
        return {
            "address": address,
            "epoch": epoch,
            "time": time.time(),
            "uptime": now - self.started,
            "nodes": [self._node(m, now) for m in (*servers, *workers)],
            "tables": [self._table(spec) for spec in tables],
            "servers": per_server,
            "staleness": staleness,
            "checkpoint": ck,
            "buckets": {"latency": list(LATENCY_BUCKETS), "staleness": list(STALENESS_BUCKETS)},
        }
