"""Watching a job: the workers' training scalars, examples, bytes per table, the servers'
latency quantiles, memory and CPU reach ``paramserver status`` and the Prometheus endpoint for
the whole job, and every metric the shipped Grafana dashboard queries is exported."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.metrics import HistWindow, quantile
from tests import procs
from tests.timing import FAST, wait_until

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
DIM, KEYS, STEPS = 4, 5, 3

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(address: str, *extra: str) -> str:
    got = subprocess.run(
        [sys.executable, "-m", "paramserver.cli", "status", "--coordinator", address, *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    return got.stdout


def train(client: ps.Client, offset: int) -> None:
    emb = client.sparse_table("emb", dim=DIM, optimizer=ps.optim.SGD(lr=0.1))
    for step in range(STEPS):  # fresh keys each step: no key list is cached, all travel
        keys = np.arange(KEYS, dtype=np.uint64) + np.uint64(offset + 100 * step)
        emb.pull(keys)
        emb.push(keys, np.ones((KEYS, DIM), np.float32)).result()
        client.clock()


def metric_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}


def test_status_and_prometheus_show_the_whole_job(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    port = free_port()
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST, metrics_port=port) as cluster:
        a, b = cluster.connect(rank=0), cluster.connect(rank=1)
        train(a, 0)
        train(b, 10_000)
        a.report(examples=100, loss=1.0, auc=0.5)
        b.report(examples=50, loss=3.0)
        a.save(tmp_path / "ckpt")
        # what each worker's requests carried: keys with the pull and the push, gradients with
        # the push; rows with the pull's answer
        to_servers = STEPS * (2 * KEYS * 8 + KEYS * DIM * 4)
        from_servers = STEPS * KEYS * DIM * 4

        def whole_job() -> dict[str, Any] | None:
            st = json.loads(status(cluster.address, "--json"))
            t = st["training"]
            emb = next(x for x in st["tables"] if x["name"] == "emb")
            ready = (
                t["examples"] == 150
                and "auc" in t["scalars"]
                and t["scalars"]["loss"]["workers"] == 2
                and emb["bytes_to_servers"] == 2 * to_servers
                and all(s["latency_quantiles"].get("pull", {}).get("p50") for s in st["servers"])
                and all(s["cpu_percent"] is not None for s in st["servers"])
            )
            return st if ready else None

        wait_until(whole_job, 30, "the workers' reports and the servers' stats in the status")
        st = whole_job()
        assert st is not None
        assert st["training"]["scalars"]["loss"] == {
            "mean": 2.0, "min": 1.0, "max": 3.0, "workers": 2
        }  # fmt: skip
        assert st["training"]["scalars"]["auc"] == {
            "mean": 0.5, "min": 0.5, "max": 0.5, "workers": 1
        }  # fmt: skip
        assert b.training()["scalars"]["loss"]["mean"] == 2.0  # what a worker's plot draws
        emb = next(x for x in st["tables"] if x["name"] == "emb")
        assert emb["bytes_from_servers"] == 2 * from_servers
        by_rank = {n["rank"]: n for n in st["nodes"] if n["role"] == "worker"}
        assert by_rank[0]["scalars"] == {"loss": 1.0, "auc": 0.5}
        pids = cluster.pids
        for s in st["servers"]:  # against what /proc says of the same process
            measured = procs.rss_mib(pids[f"server {s['rank']}"]) * 2**20
            assert 0.5 < s["rss_bytes"] / measured < 2.0, (s["rss_bytes"], measured)
            q = s["latency_quantiles"]["pull"]
            assert 0 < q["p50"] <= q["p99"]

        text = status(cluster.address)
        assert "TRAINING (whole job)" in text and "examples 150" in text, text
        assert "loss: mean 2  min 1  max 3  (2 workers)" in text, text
        assert "pull p50/p99" in text

        dashboard = json.loads(DASHBOARD.read_text())
        queried = {
            name
            for p in dashboard["panels"]
            for t in p["targets"]
            for name in re.findall(r"\bps_[a-z_]+", t["expr"])
        }
        assert len(queried) > 15
        seen = [""]

        def scraped() -> bool:
            # the exporter serves the coordinator's last snapshot (rebuilt each second when the
            # servers are asked for stats): wait for one that has them
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                seen[0] = r.read().decode()
            return not queried - metric_names(seen[0])

        with contextlib.suppress(AssertionError):
            wait_until(scraped, 20, "a metrics snapshot with every metric the dashboard queries")
        exported = seen[0]
    assert 'ps_job_scalar{name="loss",stat="mean"} 2.0' in exported
    assert "ps_job_examples_total 150.0" in exported
    assert 'ps_table_traffic_bytes_per_second{direction="to_servers",table="emb"}' in exported
    missing = sorted(queried - metric_names(exported))
    assert not missing, f"the dashboard queries metrics the exporter lacks: {missing}"


def test_report_refuses_what_it_cannot_show() -> None:
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        with pytest.raises(ps.errors.ConfigError, match="finite number"):
            client.report(loss=float("nan"))
        with pytest.raises(ps.errors.ConfigError, match="letters, digits"):
            client.report(**{"my loss": 1.0})
        with pytest.raises(ps.errors.ConfigError, match="at most 32"):
            client.report(**{f"m{i}": 1.0 for i in range(33)})


def test_quantiles_of_recent_requests_match_numpy() -> None:
    rng = np.random.default_rng(0)
    bounds = [float(b) for b in range(1, 101)]
    values = rng.uniform(0, 100, 20_000)
    counts = np.bincount(np.searchsorted(bounds, values), minlength=101).tolist()
    for q in (0.5, 0.99):  # within one bucket of the exact quantile
        assert abs(quantile(bounds, counts, q) - np.quantile(values, q)) < 1.0  # type: ignore[operator]
    assert quantile(bounds, [0] * 101, 0.5) is None
    w = HistWindow(window=10.0)
    w.add(0.0, [1, 2])
    w.add(5.0, [4, 2])
    w.add(20.0, [6, 9])
    assert w.recent() == [2, 7]  # the observations since t=5
    w.add(21.0, [0, 1])  # the server restarted: counted from zero again
    assert w.recent() == [0, 1]
