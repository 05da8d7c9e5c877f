"""Counters, timings and staleness histograms; the cluster status; Prometheus.

A leaf module (it imports only ``paramserver.errors``, so the server, the coordinator and the
client can all stand on it): servers keep :class:`ServerMetrics` (latency of pulls and pushes,
staleness served per table) and send them inside their ``stats`` answers; the coordinator
polls those answers, adds membership and the workers' reported clocks and examples, and keeps
the result as one plain map, the *status* (:func:`format_status` prints it,
``paramserver status`` shows it, :func:`serve_prometheus` exports it).

Histograms have fixed buckets (upper bounds, Prometheus ``le`` semantics: a value lands in the
first bucket whose bound is >= it; the last bucket is +Inf), so they add up across servers.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from paramserver.errors import ConfigError

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_SCALARS",
    "STALENESS_BUCKETS",
    "HistWindow",
    "Histogram",
    "Rate",
    "ServerMetrics",
    "check_scalar",
    "format_status",
    "process_gone",
    "process_usage",
    "quantile",
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


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram, linear within its bucket (Prometheus'
    ``histogram_quantile``); the last bound for the +Inf bucket; None when it is empty.

    Example:
        quantile([1, 2], [0, 10, 0], 0.5)   # 1.5
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    acc = 0
    for i, c in enumerate(counts):
        if c and acc + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lo = 0.0 if i == 0 else float(bounds[i - 1])
            return lo + (float(bounds[i]) - lo) * (rank - acc) / c
        acc += c
    return float(bounds[-1])


class HistWindow:
    """The observations of a growing histogram (counts since its start) within the last
    ``window`` seconds of samples; a counter that went down restarted (a node came back).

    Example:
        w = HistWindow(); w.add(0.0, [0, 5]); w.add(5.0, [2, 9]); w.recent()   # [2, 9]
    """

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, list[int]]] = deque()

    def add(self, t: float, counts: Sequence[int]) -> None:
        last = self.samples[-1][1] if self.samples else None
        if (
            last is None
            or len(last) != len(counts)
            or any(a < b for a, b in zip(counts, last, strict=True))
        ):
            self.samples.clear()
            self.samples.append((t, [0] * len(counts)))  # counted from zero at its start
        self.samples.append((t, list(counts)))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def recent(self) -> list[int]:
        if not self.samples:
            return []
        first, last = self.samples[0][1], self.samples[-1][1]
        return [b - a for a, b in zip(first, last, strict=True)]


MAX_SCALARS = 32  # training scalar names per worker (client.report)
_SCALAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def check_scalar(name: str, value: Any) -> None:
    """A training scalar a worker may report: a name Prometheus can label with, a finite
    number.

    Example:
        check_scalar("loss", 0.41)
    """
    if not _SCALAR_NAME.fullmatch(name):
        raise ConfigError(
            f"report: scalar name {name!r} must be letters, digits and '_' (at most 64)"
        )
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"report: {name} must be a finite number, got {value!r}")


def process_usage() -> dict[str, float]:
    """This process's resident memory (bytes) and CPU time (seconds, user + system).

    Example:
        process_usage()   # {"rss_bytes": 81920000.0, "cpu_seconds": 12.5}
    """
    t = os.times()
    rss = 0.0
    try:
        with open("/proc/self/statm") as f:
            rss = float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # not Linux: the peak, the best there is

        rss = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return {"rss_bytes": rss, "cpu_seconds": t.user + t.system}


def process_gone(pid: int) -> bool:
    """Whether surely no process ``pid`` runs on this host (False when it cannot be told,
    e.g. one of another user).

    Example:
        process_gone(os.getpid())   # False
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class ServerMetrics:
    """What a server measures about its own work; :meth:`to_wire` goes into its stats answer
    (with the process's memory and CPU time)."""

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
            "process": process_usage(),
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


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f}s" if seconds >= 1 else f"{seconds * 1000:.3g}ms"


def _p50_p99(q: dict[str, float | None] | None) -> str:
    return "-" if not q else f"{_ms(q.get('p50'))}/{_ms(q.get('p99'))}"


def _training(t: dict[str, Any]) -> list[str]:
    if not t:
        return []
    lines = [
        "",
        "TRAINING (whole job)",
        f"examples {t.get('examples', 0)}  examples/s {t.get('examples_per_s', 0.0):.1f}",
    ]
    for name, v in (t.get("scalars") or {}).items():
        lines.append(
            f"{name}: mean {v['mean']:.6g}  min {v['min']:.6g}  max {v['max']:.6g}  "
            f"({v['workers']} worker{'' if v['workers'] == 1 else 's'})"
        )
    return lines


def format_status(status: dict[str, Any]) -> str:
    """The status map as text: nodes, workers, tables, servers' traffic and staleness.

    Example:
        print(format_status(coordinator.status()))
    """
    lines = [
        f"cluster at {status.get('address', '?')}  view {status.get('view', '?')}  "
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
    rows = [["rank", "state", "clock", "examples", "examples/s", "reported"]]
    for n in status.get("nodes", []):
        if n["role"] == "worker":
            rows.append(
                [
                    str(n["rank"]),
                    n["state"],
                    str(n.get("clock", 0)),
                    str(n.get("examples", 0)),
                    f"{n.get('examples_per_s', 0.0):.1f}",
                    " ".join(f"{k}={v:.4g}" for k, v in (n.get("scalars") or {}).items()) or "-",
                ]
            )
    lines += _table(rows)
    lines += _training(status.get("training") or {})
    lines += ["", "TABLES (to/from servers: bytes/s of all workers' requests and answers)"]
    rows = [
        ["table", "kind", "consistency", "optimizer", "to servers", "from servers", "server",
         "rows", "bytes", "pulls/s", "pushes/s"]
    ]  # fmt: skip
    for t in status.get("tables", []):
        per = t.get("servers") or [{}]
        for i, s in enumerate(per):
            head = (
                [t["name"], t["kind"], t["consistency"], t["optimizer"],
                 _size(t.get("bytes_to_servers_per_s", 0.0)) + "/s",
                 _size(t.get("bytes_from_servers_per_s", 0.0)) + "/s"]
                if i == 0 else [""] * 6
            )  # fmt: skip
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
    lines += ["", "SERVERS (latency: the last 10s of requests)"]
    rows = [
        ["rank", "min clock", "deferred pulls", "pulls/s", "pushes/s", "pull p50/p99",
         "push p50/p99", "memory", "cpu", "stats"]
    ]  # fmt: skip
    for s in status.get("servers", []):
        q = s.get("latency_quantiles") or {}
        rss, cpu = s.get("rss_bytes"), s.get("cpu_percent")
        rows.append(
            [
                str(s["rank"]),
                str(s.get("min_clock", "-")),
                str(s.get("deferred", "-")),
                f"{s.get('pulls_per_s', 0.0):.1f}",
                f"{s.get('pushes_per_s', 0.0):.1f}",
                _p50_p99(q.get("pull")),
                _p50_p99(q.get("push")),
                "-" if rss is None else _size(rss),
                "-" if cpu is None else f"{cpu:.0f}%",
                _ago(s.get("age")),
            ]
        )
    lines += _table(rows)
    job = status.get("latency") or {}
    if job:
        lines.append(
            "all servers: "
            + "  ".join(f"{k} p50/p99 {_p50_p99(v)}" for k, v in sorted(job.items()))
        )
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


_QUANTILES = (("p50", "0.5"), ("p99", "0.99"))


def _training_families(st: dict[str, Any], gauge: Any, counter: Any) -> list[Any]:
    """The whole job's training numbers and each worker's scalars; bytes/s per table."""
    job = st.get("training") or {}
    examples = counter("ps_job_examples", "examples all workers reported")
    examples.add_metric([], float(job.get("examples", 0)))
    rate = gauge("ps_job_examples_per_second", "examples/s of all live workers together")
    rate.add_metric([], float(job.get("examples_per_s", 0.0)))
    scalar = gauge(
        "ps_job_scalar",
        "a training scalar over the workers that reported it (client.report): mean, min, max",
        labels=["name", "stat"],
    )
    for name, v in (job.get("scalars") or {}).items():
        for stat in ("mean", "min", "max"):
            scalar.add_metric([name, stat], float(v[stat]))
    per_worker = gauge(
        "ps_worker_scalar", "a worker's newest training scalar", labels=["rank", "name"]
    )
    for n in st["nodes"]:
        for name, v in (n.get("scalars") or {}).items():
            per_worker.add_metric([str(n["rank"]), name], float(v))
    traffic = gauge(
        "ps_table_traffic_bytes_per_second",
        "bytes/s of a table's requests (to_servers: keys, gradients) and answers (from_servers: "
        "rows), all workers together",
        labels=["table", "direction"],
    )
    for t in st["tables"]:
        for d in ("to_servers", "from_servers"):
            traffic.add_metric([t["name"], d], float(t.get(f"bytes_{d}_per_s", 0.0)))
    return [examples, rate, scalar, per_worker, traffic]


def _server_families(st: dict[str, Any], gauge: Any) -> list[Any]:
    """Latency quantiles of the last 10 s (per server and over all), memory and CPU."""
    lat = gauge(
        "ps_request_latency_seconds",
        "quantile of a server's request latency over the last 10s",
        labels=["server", "kind", "quantile"],
    )
    rss = gauge("ps_server_resident_memory_bytes", "a server's resident memory", labels=["server"])
    cpu = gauge(
        "ps_server_cpu_percent", "a server's CPU use (100: one core busy)", labels=["server"]
    )
    for s in st["servers"]:
        for kind, q in (s.get("latency_quantiles") or {}).items():
            for key, label in _QUANTILES:
                if q.get(key) is not None:
                    lat.add_metric([str(s["rank"]), kind, label], float(q[key]))
        if s.get("rss_bytes") is not None:
            rss.add_metric([str(s["rank"])], float(s["rss_bytes"]))
        if s.get("cpu_percent") is not None:
            cpu.add_metric([str(s["rank"])], float(s["cpu_percent"]))
    job = gauge(
        "ps_job_request_latency_seconds",
        "quantile of the request latency over all servers' last 10s",
        labels=["kind", "quantile"],
    )
    for kind, q in (st.get("latency") or {}).items():
        for key, label in _QUANTILES:
            if q.get(key) is not None:
                job.add_metric([kind, label], float(q[key]))
    return [lat, rss, cpu, job]


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
            for state in ("pending", "alive", "rebuilding", "dead", "left"):
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
            yield from _training_families(st, GaugeMetricFamily, CounterMetricFamily)

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
            yield from _server_families(st, GaugeMetricFamily)

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
