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
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from paramserver.coordinator.membership import ALIVE, Member
from paramserver.metrics import LATENCY_BUCKETS, STALENESS_BUCKETS, HistWindow, Rate, quantile
from paramserver.spec import TableSpec

__all__ = ["StatusBoard", "sane_stats", "worker_metrics"]

log = logging.getLogger(__name__)


def _is_hist(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], list)
        and all(isinstance(c, int) for c in v[0])
        and isinstance(v[1], int | float)
    )


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def worker_metrics(m: Member) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """A worker's reported training scalars and (bytes sent, bytes received) per table, from
    its heartbeats; what does not have that shape is left out.

    Example:
        scalars, traffic = worker_metrics(member)   # {"loss": 0.4}, {"emb": (1024, 4096)}
    """
    got = m.metrics if isinstance(m.metrics, dict) else {}
    raw_scalars = got.get("scalars")
    raw_bytes = got.get("bytes")
    scalars = {
        k: float(v)
        for k, v in (raw_scalars.items() if isinstance(raw_scalars, dict) else ())
        if isinstance(k, str) and _is_num(v)
    }
    traffic = {
        k: (int(v[0]), int(v[1]))
        for k, v in (raw_bytes.items() if isinstance(raw_bytes, dict) else ())
        if isinstance(k, str)
        and isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int) and x >= 0 for x in v)
    }
    return scalars, traffic


def _quantiles(bounds: Sequence[float], counts: Sequence[int]) -> dict[str, float | None]:
    return {"p50": quantile(bounds, counts, 0.5), "p99": quantile(bounds, counts, 0.99)}


def _bytes_by_table(workers: Sequence[Member]) -> dict[str, tuple[int, int]]:
    """Bytes sent and received per table, summed over every worker's counters."""
    out: dict[str, tuple[int, int]] = {}
    for m in workers:
        for table, (sent, got) in worker_metrics(m)[1].items():
            a, b = out.get(table, (0, 0))
            out[table] = (a + sent, b + got)
    return out


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
    proc = m.get("process", {}) if isinstance(m, dict) else None
    return (
        isinstance(proc, dict)
        and all(_is_num(v) for v in proc.values())
        and isinstance(m, dict)
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
        board.status(now=2.0, address="tcp://h:1", view_number=3, servers=servers, workers=workers,
                     tables=specs, last_checkpoint=None)["tables"][0]["servers"][0]["rows"]  # 5
    """

    def __init__(self, now: float) -> None:
        self.started = now
        self._examples_rate: dict[int, Rate] = {}
        self._server_stats: dict[int, tuple[float, dict[str, Any]]] = {}
        self._server_rates: dict[tuple[int, str, str], Rate] = {}
        self._latency: dict[tuple[int, str], HistWindow] = {}  # (server, kind)
        self._cpu: dict[int, Rate] = {}  # server rank -> CPU seconds
        # (worker, table, 0 sent / 1 received) -> bytes; and when each worker was sampled
        self._traffic: dict[tuple[int, str, int], Rate] = {}
        self._traffic_seen: dict[int, float] = {}

    def record_examples(self, rank: int, now: float, examples: int) -> None:
        """Worker ``rank`` reported ``examples`` trained in all (its heartbeat)."""
        self._examples_rate.setdefault(rank, Rate()).add(now, examples)

    def record_stats(self, rank: int, stats: Any, now: float) -> bool:
        """Server ``rank`` answered ``stats``: kept if it has the right shape (else False)."""
        if not sane_stats(stats):
            log.warning("server[%d] answered stats the coordinator cannot read", rank)
            return False
        self._server_stats[rank] = (now, stats)
        metrics = stats.get("metrics") or {}
        for kind, (counts, _) in (metrics.get("latency") or {}).items():
            self._latency.setdefault((rank, kind), HistWindow()).add(now, counts)
        cpu = (metrics.get("process") or {}).get("cpu_seconds")
        if cpu is not None:
            self._cpu.setdefault(rank, Rate()).add(now, float(cpu))
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
            "state": m.shown,  # "rebuilding" for a replacement under replication
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
            node["scalars"] = worker_metrics(m)[0]
        return node

    def _table(self, spec: TableSpec, totals: dict[str, tuple[int, int]]) -> dict[str, Any]:
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
        sent = [
            r.per_second() for (_, t, d), r in self._traffic.items() if t == spec.name and d == 0
        ]
        got = [
            r.per_second() for (_, t, d), r in self._traffic.items() if t == spec.name and d == 1
        ]
        return {
            "name": spec.name,
            # summed over the workers: keys and gradients to the servers, rows back
            "bytes_to_servers_per_s": sum(sent),
            "bytes_from_servers_per_s": sum(got),
            "bytes_to_servers": totals.get(spec.name, (0, 0))[0],
            "bytes_from_servers": totals.get(spec.name, (0, 0))[1],
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
                    "latency_quantiles": {
                        kind: _quantiles(LATENCY_BUCKETS, w.recent())
                        for (r, kind), w in sorted(self._latency.items())
                        if r == rank
                    },
                    "rss_bytes": (metrics.get("process") or {}).get("rss_bytes"),
                    "cpu_percent": 100.0 * self._cpu[rank].per_second()
                    if rank in self._cpu
                    else None,
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

    def _sample_traffic(self, workers: Sequence[Member]) -> None:
        """Take each worker's byte counters once per heartbeat that brought them."""
        for m in workers:
            if m.state != ALIVE:  # gone: its bytes no longer flow
                for key in [k for k in self._traffic if k[0] == m.rank]:
                    del self._traffic[key]
                self._traffic_seen.pop(m.rank, None)
                continue
            if m.metrics is None or self._traffic_seen.get(m.rank) == m.last_seen:
                continue
            self._traffic_seen[m.rank] = m.last_seen
            for table, pair in worker_metrics(m)[1].items():
                for d in (0, 1):
                    self._traffic.setdefault((m.rank, table, d), Rate()).add(
                        m.last_seen, float(pair[d])
                    )

    def _training(self, workers: Sequence[Member], nodes: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole job's training numbers: examples and examples/s summed over the workers
        (a worker no longer alive adds its examples but no rate), and per scalar its mean, min
        and max over the workers that reported it (the newest value of each)."""
        per_name: dict[str, list[float]] = {}
        for m in workers:
            for name, v in worker_metrics(m)[0].items():
                per_name.setdefault(name, []).append(v)
        rates = [
            n["examples_per_s"] for n in nodes if n["role"] == "worker" and n["state"] == ALIVE
        ]
        return {
            "examples": sum(m.examples for m in workers),
            "examples_per_s": float(sum(rates)),
            "scalars": {
                name: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "workers": len(v)}
                for name, v in sorted(per_name.items())
            },
        }

    def _job_latency(self) -> dict[str, dict[str, float | None]]:
        """Pull and push latency quantiles over every server's recent requests."""
        merged: dict[str, list[int]] = {}
        for (_, kind), w in self._latency.items():
            recent = w.recent()
            old = merged.get(kind)
            merged[kind] = (
                recent if old is None else [a + b for a, b in zip(old, recent, strict=True)]
            )
        return {kind: _quantiles(LATENCY_BUCKETS, c) for kind, c in sorted(merged.items())}

    def status(
        self,
        *,
        now: float,
        address: str,
        view_number: int,
        servers: Sequence[Member],
        workers: Sequence[Member],
        tables: Iterable[TableSpec],
        last_checkpoint: tuple[float, str] | None,
    ) -> dict[str, Any]:
        """The cluster's state as one plain map: nodes, workers' clocks and examples/s, tables
        per server, servers' traffic, staleness, the last checkpoint (wall time, directory)."""
        self._sample_traffic(workers)
        per_server, staleness = self._servers(now, servers)
        nodes = [self._node(m, now) for m in (*servers, *workers)]
        ck = None
        if last_checkpoint is not None:
            ck = {"path": last_checkpoint[1], "age": time.time() - last_checkpoint[0]}
        return {
            "address": address,
            "view": view_number,
            "epoch": view_number,  # its old name, kept for scripts that read it
            "time": time.time(),
            "uptime": now - self.started,
            "nodes": nodes,
            "training": self._training(workers, nodes),
            "latency": self._job_latency(),
            "tables": [self._table(spec, _bytes_by_table(workers)) for spec in tables],
            "servers": per_server,
            "staleness": staleness,
            "checkpoint": ck,
            "buckets": {"latency": list(LATENCY_BUCKETS), "staleness": list(STALENESS_BUCKETS)},
        }
