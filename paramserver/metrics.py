"""Counters, timings and staleness histograms; the cluster status; Prometheus.

A pure leaf module (it imports nothing else from paramserver, so the server and the coordinator
can both stand on it): servers keep :class:`ServerMetrics` (latency of pulls and pushes,
staleness served per table) and send them inside their ``stats`` answers; the coordinator
polls those answers, adds membership and the workers' reported clocks and examples, and keeps
the result as one plain map, the *status* (:func:`format_status` prints it,
``paramserver status`` shows it, :func:`serve_prometheus` exports it).

Histograms have fixed buckets (upper bounds, Prometheus ``le`` semantics: a value lands in the
first bucket whose bound is >= it; the last bucket is +Inf), so they add up across servers.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "LATENCY_BUCKETS",
    "STALENESS_BUCKETS",
    "Histogram",
    "Rate",
    "ServerMetrics",
    "format_status",
    "serve_prometheus",
]

# seconds a server spends on one pull or push request (decode excluded)
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
)  # fmt: skip
# clocks of other workers' updates a pull may be missing
STALENESS_BUCKETS: tuple[float, ...] = (0, 1, 2, 3, 4, 8, 16, 32, 64)


class Histogram:
    """Counts of observations per bucket, and their sum.

    Example:
        h = Histogram(STALENESS_BUCKETS); h.observe(1); h.to_wire()  # [[0, 1, 0, ...], 1.0]
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_wire(self) -> list[Any]:
        return [list(self.counts), self.sum]


class ServerMetrics:
    """What a server measures about its own work; :meth:`to_wire` goes into its stats answer."""

    def __init__(self) -> None:
        self.latency = {k: Histogram(LATENCY_BUCKETS) for k in ("pull", "push")}
        self.staleness: dict[str, Histogram] = {}

    def observe_request(self, kind: str, seconds: float) -> None:
        h = self.latency.get(kind)
        if h is not None:
            h.observe(seconds)

    def observe_staleness(self, table: str, staleness: int) -> None:
        h = self.staleness.get(table)
        if h is None:
            h = self.staleness[table] = Histogram(STALENESS_BUCKETS)
        h.observe(staleness)

    def to_wire(self) -> dict[str, Any]:
        return {
            "latency": {k: h.to_wire() for k, h in self.latency.items()},
            "staleness": {k: h.to_wire() for k, h in self.staleness.items()},
        }


class Rate:
    """Per-second rate of a growing counter over the last ``window`` seconds of samples.

    Example:
        r = Rate(); r.add(0.0, 0); r.add(2.0, 100); r.per_second()  # 50.0
    """

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, t: float, value: float) -> None:
        if self.samples and value < self.samples[-1][1]:
            self.samples.clear()  # the counter restarted (a node came back)
        self.samples.append((t, value))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def per_second(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


# ---- text -------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s ago"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_status(status: dict[str, Any]) -> str:
    """The status map as text: nodes, workers, tables, servers' traffic and staleness.

    Example:
        print(format_status(coordinator.status()))
    """
    lines = [
        f"cluster at {status.get('address', '?')}  view {status.get('epoch', '?')}  "
        f"up {status.get('uptime', 0.0):.0f}s"
    ]
    ck = status.get("checkpoint") or {}
    if ck.get("path"):
        lines.append(f"last checkpoint {ck['path']} ({_ago(ck.get('age'))})")
    lines += ["", "NODES"]
    rows = [["role", "rank", "state", "address", "host", "pid", "last heartbeat"]]
    for n in status.get("nodes", []):
        rows.append(
            [
                n["role"],
                str(n["rank"]),
                n["state"],
                n.get("address") or "-",
                n.get("host") or "-",
                str(n.get("pid") or "-"),
                _ago(n.get("last_heartbeat")),
            ]
        )
    lines += _table(rows)
    lines += ["", "WORKERS"]
    rows = [["rank", "state", "clock", "examples", "examples/s"]]
    for n in status.get("nodes", []):
        if n["role"] == "worker":
            rows.append(
                [
                    str(n["rank"]),
                    n["state"],
                    str(n.get("clock", 0)),
                    str(n.get("examples", 0)),
                    f"{n.get('examples_per_s', 0.0):.1f}",
                ]
            )
    lines += _table(rows)
    lines += ["", "TABLES"]
    rows = [
        ["table", "kind", "consistency", "optimizer", "server", "rows", "bytes", "pulls/s", "pushes/s"]
    ]  # fmt: skip
    for t in status.get("tables", []):
        per = t.get("servers") or [{}]
        for i, s in enumerate(per):
            head = [t["name"], t["kind"], t["consistency"], t["optimizer"]] if i == 0 else [""] * 4
            rows.append(
                [
                    *head,
                    str(s.get("rank", "-")),
                    str(s.get("rows", 0)),
                    _size(s.get("bytes", 0)),
                    f"{s.get('pulls_per_s', 0.0):.1f}",
                    f"{s.get('pushes_per_s', 0.0):.1f}",
                ]
            )
    lines += _table(rows)
    lines += ["", "SERVERS"]
    rows = [["rank", "min clock", "deferred pulls", "pulls/s", "pushes/s", "stats"]]
    for s in status.get("servers", []):
        rows.append(
            [
                str(s["rank"]),
                str(s.get("min_clock", "-")),
                str(s.get("deferred", "-")),
                f"{s.get('pulls_per_s', 0.0):.1f}",
                f"{s.get('pushes_per_s', 0.0):.1f}",
                _ago(s.get("age")),
            ]
        )
    lines += _table(rows)
    stale = status.get("staleness") or {}
    if stale:
        lines += ["", "STALENESS (pulls served, by clocks behind)"]
        bounds = status.get("buckets", {}).get("staleness", list(STALENESS_BUCKETS))
        labels = [f"<={b:g}" for b in bounds] + [f">{bounds[-1]:g}"]
        for name, (counts, total) in sorted(stale.items()):
            n = sum(counts)
            mean = total / n if n else 0.0
            parts = [f"{lab}:{c}" for lab, c in zip(labels, counts, strict=True) if c]
            lines.append(f"{name}: {n} pulls, mean {mean:.2f}  " + " ".join(parts))
    return "\n".join(lines)


# ---- Prometheus -------------------------------------------------------------------------------


def _buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    out, acc = [], 0
    for b, c in zip([*bounds, float("inf")], counts, strict=True):
        acc += c
        out.append(("+Inf" if b == float("inf") else repr(float(b)), float(acc)))
    return out


def serve_prometheus(
    snapshot: Callable[[], dict[str, Any] | None], port: int, host: str = "127.0.0.1"
) -> Callable[[], None]:
    """Serve the status returned by ``snapshot()`` as Prometheus metrics over HTTP on
    ``host:port`` (a thread); returns the function that stops the server. Needs the
    ``prometheus_client`` package (``pip install 'paramserver[ops]'``).

    Example:
        stop = serve_prometheus(lambda: coord.snapshot, 9100); ...; stop()
    """
    try:
        from prometheus_client import start_http_server
        from prometheus_client.core import (
            CollectorRegistry,
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.registry import Collector
    except ImportError as exc:  # the ops extra is not installed
        raise ImportError("metrics need prometheus_client: pip install 'paramserver[ops]'") from exc

    class _Cluster(Collector):
        def collect(self) -> Any:
            st = snapshot()
            if st is None:
                return
            up = GaugeMetricFamily("ps_node_up", "1 if the node is alive", labels=["role", "rank"])
            nodes = GaugeMetricFamily("ps_nodes", "nodes by role and state", labels=["role", "state"])  # fmt: skip
            hb = GaugeMetricFamily(
                "ps_node_heartbeat_age_seconds", "seconds since the last heartbeat",
                labels=["role", "rank"],
            )  # fmt: skip
            counts: dict[tuple[str, str], int] = {}
            for n in st["nodes"]:
                up.add_metric([n["role"], str(n["rank"])], 1.0 if n["state"] == "alive" else 0.0)
                counts[(n["role"], n["state"])] = counts.get((n["role"], n["state"]), 0) + 1
                if n.get("last_heartbeat") is not None:
                    hb.add_metric([n["role"], str(n["rank"])], n["last_heartbeat"])
            for state in ("pending", "alive", "dead", "left"):
                for role in ("server", "worker"):
                    nodes.add_metric([role, state], float(counts.get((role, state), 0)))
            dead = GaugeMetricFamily("ps_dead_nodes", "nodes declared dead")
            dead.add_metric([], float(sum(v for (_, s), v in counts.items() if s == "dead")))
            yield from (up, nodes, hb, dead)

            clock = GaugeMetricFamily("ps_worker_clock", "a worker's clock", labels=["rank"])
            ex = CounterMetricFamily(
                "ps_worker_examples", "examples a worker reported", labels=["rank"]
            )
            eps = GaugeMetricFamily(
                "ps_worker_examples_per_second", "a worker's examples/s", labels=["rank"]
            )
            for n in st["nodes"]:
                if n["role"] == "worker":
                    clock.add_metric([str(n["rank"])], float(n.get("clock", 0)))
                    ex.add_metric([str(n["rank"])], float(n.get("examples", 0)))
                    eps.add_metric([str(n["rank"])], float(n.get("examples_per_s", 0.0)))
            yield from (clock, ex, eps)

            lab = ["table", "server"]
            rows = GaugeMetricFamily("ps_table_rows", "rows of a table on a server", labels=lab)
            size = GaugeMetricFamily("ps_table_bytes", "bytes of a table on a server", labels=lab)
            pulls = CounterMetricFamily("ps_pulls", "pull requests answered", labels=lab)
            pushes = CounterMetricFamily("ps_pushes", "push requests applied", labels=lab)
            pull_rate = GaugeMetricFamily("ps_pulls_per_second", "pulls/s", labels=lab)
            push_rate = GaugeMetricFamily("ps_pushes_per_second", "pushes/s", labels=lab)
            for t in st["tables"]:
                for s in t["servers"]:
                    key = [t["name"], str(s["rank"])]
                    rows.add_metric(key, float(s["rows"]))
                    size.add_metric(key, float(s["bytes"]))
                    pulls.add_metric(key, float(s["pulls"]))
                    pushes.add_metric(key, float(s["pushes"]))
                    pull_rate.add_metric(key, s["pulls_per_s"])
                    push_rate.add_metric(key, s["pushes_per_s"])
            yield from (rows, size, pulls, pushes, pull_rate, push_rate)

            lat = HistogramMetricFamily(
                "ps_request_seconds",
                "seconds a server spent on one request",
                labels=["server", "kind"],
            )
            mclock = GaugeMetricFamily(
                "ps_server_min_clock", "slowest live worker's clock", labels=["server"]
            )
            bounds = st["buckets"]["latency"]
            for s in st["servers"]:
                if "min_clock" in s:
                    mclock.add_metric([str(s["rank"])], float(s["min_clock"]))
                for kind, (cnt, total) in (s.get("latency") or {}).items():
                    lat.add_metric([str(s["rank"]), kind], _buckets(bounds, cnt), total)
            yield from (lat, mclock)

            stale = HistogramMetricFamily(
                "ps_pull_staleness", "staleness pulls were served with", labels=["table"]
            )
            for name, (cnt, total) in sorted(st["staleness"].items()):
                stale.add_metric([name], _buckets(st["buckets"]["staleness"], cnt), total)
            yield stale

            ck = st.get("checkpoint") or {}
            if ck.get("age") is not None:
                age = GaugeMetricFamily(
                    "ps_checkpoint_age_seconds", "seconds since the last checkpoint was written"
                )
                age.add_metric([], ck["age"])
                yield age
            info = GaugeMetricFamily("ps_status_time_seconds", "when this status was gathered")
            info.add_metric([], float(st.get("time", time.time())))
            yield info

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Cluster())
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
