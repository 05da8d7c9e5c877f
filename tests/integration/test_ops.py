"""Watching a live cluster: the coordinator's ``status`` (``paramserver status``) and its
Prometheus metrics endpoint, on a real LocalCluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import ProtocolError
from paramserver.metrics import Histogram, Rate, format_status
from paramserver.wire import protocol
from tests.timing import FAST, wait_until

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_of(address: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paramserver.cli", "status", "--coordinator", address, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """``wait_until`` that returns what ``check`` last gave (the status or metrics seen)."""
    got: list[Any] = [None]

    def seen() -> Any:
        got[0] = check()
        return got[0]

    wait_until(seen, timeout, what, every=0.2)
    return got[0]


def train_a_little(client: ps.Client, steps: int) -> None:
    emb = client.sparse_table("emb", dim=4, consistency="ssp:1")
    dense = client.dense_table("w", shape=(64,), consistency="async")
    for _ in range(steps):
        keys = np.arange(20, dtype=np.uint64)
        emb.pull(keys)
        emb.push(keys, np.ones((20, 4), np.float32)).result(30)
        dense.pull()
        dense.push(np.zeros(64, np.float32)).result(30)
        client.report(examples=32)
        client.clock()


def test_status_command_shows_nodes_tables_clocks_and_rates() -> None:
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        train_a_little(client, 5)

        def trained() -> dict[str, Any] | None:
            got = json.loads(status_of(cluster.address, "--json").stdout)
            worker = next(n for n in got["nodes"] if n["role"] == "worker")
            rows = sum(s["rows"] for t in got["tables"] if t["name"] == "emb" for s in t["servers"])
            pulls = sum(
                s["pulls"] for t in got["tables"] if t["name"] == "emb" for s in t["servers"]
            )
            done = worker["examples"] == 160 and worker["clock"] == 5 and rows == 20 and pulls == 10
            return got if done else None

        st = wait_for("the status to show the training", trained)
        assert {(n["role"], n["rank"], n["state"]) for n in st["nodes"]} == {
            ("server", 0, "alive"),
            ("server", 1, "alive"),
            ("worker", 0, "alive"),
        }
        tables = {t["name"]: t for t in st["tables"]}
        assert tables["emb"]["consistency"] == "ssp:1" and tables["emb"]["kind"] == "sparse"
        assert tables["w"]["kind"] == "dense"
        assert sum(s["bytes"] for s in tables["w"]["servers"]) >= 64 * 4
        # every pull was counted in a staleness histogram and timed on its server
        assert sum(st["staleness"]["emb"][0]) == sum(s["pulls"] for s in tables["emb"]["servers"])
        pulls_timed = sum(sum(s["latency"]["pull"][0]) for s in st["servers"])
        assert pulls_timed == sum(s["pulls"] for t in st["tables"] for s in t["servers"])

        text = status_of(cluster.address)
        assert text.returncode == 0, text.stderr
        for word in ("NODES", "WORKERS", "TABLES", "SERVERS", "emb", "ssp:1", "STALENESS"):
            assert word in text.stdout

        watch = status_of(cluster.address, "--watch", "--interval", "0.1", "--count", "2")
        assert watch.returncode == 0, watch.stderr
        assert watch.stdout.count("NODES") == 2


def test_status_of_nothing_fails_with_a_reason() -> None:
    got = status_of(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert got.returncode == 2
    assert "status of the coordinator" in got.stderr


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_endpoint_of_a_live_cluster_moves() -> None:
    pytest.importorskip("prometheus_client")
    port = free_port()
    with ps.LocalCluster(
        servers=2, workers=1, timeouts=FAST, metrics_port=port, restart_servers=False
    ) as cluster:  # the killed server stays dead
        client = cluster.connect()
        train_a_little(client, 2)
        first = wait_for(
            "the first metrics",
            lambda: (
                (m := scrape(port)).get('ps_worker_clock{rank="0"}') == 2
                and m.get('ps_pull_staleness_count{table="emb"}') == 4  # 2 pulls over 2 servers
                and m
            ),
        )
        train_a_little(client, 3)
        later = wait_for(
            "the metrics to move",
            lambda: (
                (m := scrape(port)).get('ps_worker_examples_total{rank="0"}') == 160
                and m.get('ps_pull_staleness_count{table="emb"}') == 10
                and m
            ),
        )
        assert first['ps_node_up{rank="1",role="server"}'] == 1.0
        assert later["ps_dead_nodes"] == 0.0

        def total(metrics: dict[str, float], prefix: str) -> float:
            return sum(v for k, v in metrics.items() if k.startswith(prefix))

        # rows and bytes per table, pull counts and latency histograms per server
        assert (
            total(later, 'ps_table_rows{server="0",table="emb"}')
            + total(later, 'ps_table_rows{server="1",table="emb"}')
            == 20
        )
        assert total(later, "ps_pulls_total") > total(first, "ps_pulls_total")
        assert total(later, "ps_request_seconds_count") > total(first, "ps_request_seconds_count")

        # a dead server shows
        pid = next(
            p for name, p in cluster.pids.items() if name.startswith("server") and "1" in name
        )
        os.kill(pid, 9)
        wait_for("a dead node in the metrics", lambda: scrape(port).get("ps_dead_nodes") == 1.0)


def test_checkpoint_age_in_status(tmp_path: Any) -> None:
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        train_a_little(client, 1)
        path = client.save(tmp_path / "ckpt")
        got = wait_for(
            "the checkpoint in the status",
            lambda: (
                (s := json.loads(status_of(cluster.address, "--json").stdout))["checkpoint"] and s
            ),
        )
        assert got["checkpoint"]["path"] == path
        assert got["checkpoint"]["age"] >= 0


def test_status_message_is_validated() -> None:
    with pytest.raises(ProtocolError, match="unexpected field"):
        protocol.decode(protocol.encode({"kind": "status", "id": 1, "extra": 1}))
    with pytest.raises(ProtocolError, match="'status'"):
        protocol.decode(protocol.encode({"kind": "reply", "id": 1, "status": {"nodes": 1}}))
    with pytest.raises(ProtocolError, match="'examples'"):
        protocol.decode(
            protocol.encode(
                {
                    "kind": "heartbeat",
                    "id": 1,
                    "role": "worker",
                    "rank": 0,
                    "token": 1,
                    "examples": -1,
                }
            )
        )


def test_histogram_rate_and_text() -> None:
    h = Histogram((0, 1, 2))
    for v in (0, 1, 1, 5):
        h.observe(v)
    assert h.to_wire() == [[1, 2, 0, 1], 7.0]
    r = Rate(window=10)
    r.add(0.0, 0)
    r.add(2.0, 100)
    assert r.per_second() == 50.0
    r.add(3.0, 10)  # a restarted counter starts a new series
    assert r.per_second() == 0.0
    text = format_status({"nodes": [], "tables": [], "servers": [], "staleness": {}, "buckets": {}})
    assert "NODES" in text
