"""Hung members and a dead coordinator: real processes paused with SIGSTOP, resumed with
SIGCONT, killed with SIGKILL; nothing mocked.

A paused server is declared dead, killed and replaced by its cluster; a replaced server that
comes back serves nothing and stops; workers and servers notice a dead coordinator and name it.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import NodeLostError, RemoteError
from paramserver.wire.transport import Endpoint, new_context
from tests.integration.test_recovery import view_of
from tests.timing import FAST, FAST_FLAGS, wait_until

pytestmark = pytest.mark.timeout(120)


def dense_on(client: ps.Client, rank: int, **kw: Any) -> ps.DenseTable:
    """A small dense table (64 floats) that lives on server ``rank`` alone: small tables go
    whole to the least loaded server, so tables are made until one lands there."""
    for i in range(8):
        t = client.dense_table(f"w{rank}-{i}", shape=(64,), **kw)
        if [s for s, _, _ in t.spec.ranges] == [rank]:
            return t
    raise AssertionError(f"no small dense table was placed on server {rank}")


def server_entry(address: str, rank: int) -> list[object]:
    servers = view_of(address)["servers"]
    assert isinstance(servers, list)
    return next(s for s in servers if s[0] == rank)


def server_clock(address: str) -> int:
    """Server 0's min clock as the coordinator last heard it."""
    ctx = new_context()
    ep = Endpoint(ctx, request_timeout=5.0)
    try:
        ep.connect("coordinator", address)
        nodes = ep.request("coordinator", {"kind": "status"}, what="status").result(5.0)
        return int(next(n["clock"] for n in nodes["status"]["nodes"] if n["role"] == "server"))
    finally:
        ep.close()
        ctx.term()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_paused_server_is_killed_and_replaced_and_training_goes_on() -> None:
    steps, pause_at = 30, 5
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect(transport="tcp")
        sgd = ps.optim.SGD(lr=1.0)
        w0, w1 = (dense_on(client, r, optimizer=sgd, consistency="sync") for r in (0, 1))
        old_pid = client.stats()[1]["pid"]
        try:
            for step in range(steps):
                if step == pause_at:
                    os.kill(old_pid, signal.SIGSTOP)
                for w in (w0, w1):
                    w.pull()
                    w.push(np.ones(64, dtype=np.float32)).result()
                client.clock()
        finally:  # never leave a stopped process behind
            if process_exists(old_pid):
                os.kill(old_pid, signal.SIGCONT)
        assert client.current_clock == steps
        assert client.stats()[1]["pid"] != old_pid  # a new process holds rank 1
        assert [r for r, _ in cluster.restarts] == [1]
        # the hung process was killed (and reaped) by the cluster, not left to come back
        assert not process_exists(old_pid)
        # server 0 never lost an update: every step lowered its table by 1
        assert np.array_equal(w0.pull(), np.full(64, -float(steps), dtype=np.float32))
        # the replacement took every step after its start (no checkpoint: it started from 0)
        assert np.all(w1.pull() < 0)


def test_a_replaced_server_that_resumes_serves_nothing_and_stops() -> None:
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST, restart_servers=False) as cluster:
        client = cluster.connect(transport="tcp")
        w = dense_on(client, 1, optimizer=ps.optim.SGD(lr=1.0))
        w.push(np.ones(64, dtype=np.float32)).result()
        old_pid = client.stats()[1]["pid"]
        old_address = server_entry(cluster.address, 1)[1]
        assert isinstance(old_address, str)
        os.kill(old_pid, signal.SIGSTOP)
        replacement: subprocess.Popen[bytes] | None = None
        try:
            wait_until(
                lambda: server_entry(cluster.address, 1)[2] == "dead", 30, "server[1] to be dead"
            )
            # a supervisor restarts rank 1 while the old process still exists (paused)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
            cmd = [sys.executable, "-m", "paramserver.cli", "server", "--host", "127.0.0.1"]
            cmd += ["--coordinator", cluster.address, "--rank", "1", *FAST_FLAGS]
            replacement = subprocess.Popen(cmd, env=env)
            wait_until(
                lambda: server_entry(cluster.address, 1)[2] == "alive",
                30,
                "the replacement of server[1] to register",
            )
            new_address = server_entry(cluster.address, 1)[1]
            assert new_address != old_address
            wait_until(
                lambda: client.endpoint.poll(0) or client.view["servers"][1][1] == new_address,
                10,
                "the worker to see the replacement",
            )
            # A worker still routed to the old process (a stale route) pushes to it while it is
            # paused; the push arrives when it resumes.
            client.endpoint.connect("server[1]", old_address)
            stale = w.push(np.full(64, 100.0, dtype=np.float32))
            os.kill(old_pid, signal.SIGCONT)
            with pytest.raises(RemoteError) as refused:
                stale.result(20)
            assert refused.value.code == "fenced", refused.value
            # ... and it stops: an expelled member answers nothing any more
            wait_until(lambda: not process_exists(old_pid) or _zombie(old_pid), 30, "it to exit")
            # the replacement holds rank 1's table afresh (no checkpoint): the stale push
            # reached nobody
            client.endpoint.connect("server[1]", new_address)
            assert np.array_equal(w.pull(), np.zeros(64, dtype=np.float32))
        finally:
            if process_exists(old_pid):
                os.kill(old_pid, signal.SIGCONT)
            if replacement is not None:
                replacement.terminate()
                replacement.wait(10)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_dead_coordinator_is_named_by_workers_and_servers() -> None:
    out = io.StringIO()
    lock = threading.Lock()

    class Locked(io.StringIO):
        def write(self, s: str) -> int:
            with lock:
                return out.write(s)

    # connect: how long a server waits for a coordinator that went silent before it stops
    timeouts = replace(FAST, connect=3.0)
    with ps.LocalCluster(
        servers=1, workers=1, timeouts=timeouts, output=Locked(), restart_coordinator=False
    ) as cluster:
        client = cluster.connect(transport="tcp")
        w = client.dense_table("w", shape=(8,), optimizer=ps.optim.SGD(lr=1.0))
        w.push(np.ones(8, dtype=np.float32)).result()
        client.barrier()
        os.kill(cluster.pids["coordinator"], signal.SIGKILL)
        server = next(p for name, p in cluster.children.procs if name == "server 0")
        # a waiting barrier gives up once the coordinator stops answering, and names it
        with pytest.raises(NodeLostError) as lost:
            client.barrier(timeout=60)
        assert f"coordinator at {cluster.address}" in str(lost.value)
        # so does the next call
        with pytest.raises(NodeLostError, match="coordinator at"):
            w.pull()
        # the standalone server says so, and stops once it has waited `connect` for it
        server.wait(30)
        with lock:
            logged = out.getvalue()
        assert f"the coordinator at {cluster.address} has not answered" in logged


REJOINING = """
import os, signal, sys
import numpy as np
import paramserver as ps
from tests.timing import FAST
client = ps.connect(sys.argv[1], rank=1, timeouts=FAST)
w = client.dense_table("w", shape=(8,), optimizer=ps.optim.SGD(lr=1.0), consistency="async")
for step in range(6):
    if step == 3:
        print("pausing at clock", client.current_clock, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)  # cut off; the test resumes it once it was dropped
    w.pull()
    w.push(np.ones(8, dtype=np.float32)).result()
    client.clock()
print("clock", client.current_clock, flush=True)
client.close()
"""


def test_a_worker_dropped_while_alive_rejoins_at_the_current_clock() -> None:
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        client = cluster.connect(rank=0)
        w = client.dense_table("w", shape=(8,), optimizer=ps.optim.SGD(lr=1.0), consistency="async")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        other = subprocess.Popen(
            [sys.executable, "-c", REJOINING, cluster.address], stdout=subprocess.PIPE, env=env
        )
        try:
            assert other.stdout is not None
            assert other.stdout.readline().startswith(b"pausing at clock 3")
            wait_until(
                lambda: dict(view_of(cluster.address)["workers"])[1] == "dead",  # type: ignore[call-overload]
                30,
                "worker[1] to be dropped",
            )
            for _ in range(20):  # the cluster moves on without it
                w.push(np.ones(8, dtype=np.float32)).result()
                client.clock()
            wait_until(
                lambda: server_clock(cluster.address) >= 20,
                30,
                "the server to report clock 20",
            )
            os.kill(other.pid, signal.SIGCONT)
            out, _ = other.communicate(timeout=60)
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()
        assert other.returncode == 0, out.decode()
        # it went on from the cluster's clock (20), not from its own (3), and trained 3 steps
        assert out.split()[-1] == b"23", out.decode()
