"""Cluster life: ranks, views, dead-node detection, barriers and timeouts that name the peer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import NodeLostError, PSError, PSTimeoutError, RemoteError
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(60)


def test_ranks_are_assigned_and_limited() -> None:
    with ps.LocalCluster(servers=2, workers=3, timeouts=FAST) as cluster:
        clients = [cluster.connect() for _ in range(3)]
        assert sorted(c.rank for c in clients) == [0, 1, 2]
        assert all(c.num_workers == 3 and c.num_servers == 2 for c in clients)
        with pytest.raises(RemoteError, match="every rank has been taken"):
            cluster.connect()


def test_a_requested_rank_is_honoured_once() -> None:
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        assert cluster.connect(rank=1).rank == 1
        with pytest.raises(RemoteError, match="rank 1 is already taken"):
            cluster.connect(rank=1)
        with pytest.raises(RemoteError, match="rank 5 asked for"):
            cluster.connect(rank=5)


KILLED_WORKER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import paramserver as ps
    client = ps.connect(sys.argv[1], rank=1)
    t = client.dense_table("w", shape=(4,), optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
    t.push(np.full(4, 100.0, np.float32)).result()   # pushed in clock 0, but never finishes it
    print("ready", flush=True)
    time.sleep(60)
""")


def test_a_killed_worker_is_declared_dead_and_sync_carries_on() -> None:
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST) as cluster:
        client = cluster.connect(rank=0)
        t = client.dense_table("w", shape=(4,), optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_WORKER, cluster.address], stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
            t.push(np.ones(4, np.float32)).result()
            client.clock()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = time.monotonic()
            w = t.pull(timeout=20)  # waits for clock 0 to complete: only once worker 1 is dead
            waited = time.monotonic() - killed_at
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # the dead worker's unfinished clock is dropped; the live worker's mean is applied
        np.testing.assert_array_equal(w, np.full(4, -1.0, np.float32))
        assert waited < FAST.heartbeat_timeout + 3.0
        states = dict(client.view["workers"])
        assert states[1] == "dead"


def test_barrier_timeout_names_the_missing_worker() -> None:
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        client = cluster.connect()
        with pytest.raises(
            RemoteError, match=r"barrier 'sync-point' timed out waiting for worker\[1\]"
        ):
            client.barrier("sync-point", timeout=0.5)


def test_a_sync_pull_that_cannot_be_served_names_the_slow_worker() -> None:
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("e", dim=2, consistency="sync")
        client.clock()
        with pytest.raises(PSError, match=r"worker\[1\] at clock 0") as info:
            emb.pull(np.arange(10), timeout=1.0)
        assert isinstance(info.value, (RemoteError, PSTimeoutError))


def test_a_worker_that_leaves_is_not_waited_for() -> None:
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST) as cluster:
        a, b = cluster.connect(), cluster.connect()
        ta = a.dense_table("d", shape=(3,), optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
        b.dense_table("d", shape=(3,), optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
        b.close()
        ta.push(np.full(3, 2.0, np.float32)).result()
        a.clock()
        np.testing.assert_array_equal(ta.pull(timeout=5), np.full(3, -2.0, np.float32))


def test_barrier_releases_every_worker() -> None:
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        a, b = cluster.connect(), cluster.connect()
        fa = a._ep.request(
            "coordinator",
            {"kind": "barrier", "name": "x#1", "rank": a.rank, "timeout": 5.0},
            what="barrier a",
        )
        assert not fa.done()
        b.barrier("x", timeout=5)
        fa.result(5)


def test_requests_to_a_killed_server_fail_fast_with_node_lost() -> None:
    # no restart: a request waits for a replacement up to its timeout, then fails
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST, restart_servers=False) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("e", dim=2)
        emb.pull(np.arange(100))
        os.kill(client.stats()[1]["pid"], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(NodeLostError, match=r"server\[1\] .* declared dead"):
            # until the new view arrives; each pull also touches server 1
            wait_until(lambda: emb.pull(np.arange(100), timeout=3) is None, 30, "a NodeLostError")
        assert time.monotonic() - start < FAST.heartbeat_timeout + 3.0 + 3.0
        assert dict((r, s) for r, _, s in client.view["servers"])[1] == "dead"
