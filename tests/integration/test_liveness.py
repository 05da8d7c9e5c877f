"""Whether a member is alive does not depend on its Python thread getting the GIL, while a
stopped or killed member is still found dead within the heartbeat timeout."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import pytest

import paramserver as ps
from tests import procs
from tests.timing import wait_until

pytestmark = pytest.mark.timeout(90)

TIMEOUTS = ps.Timeouts(heartbeat_interval=0.1, heartbeat_timeout=1.0, request=20.0, connect=20.0)


def hold_the_gil(seconds: float) -> None:
    """One C call that keeps the GIL (a PyDLL call does not release it), as a long NumPy
    string operation or a pandas parse does: no other Python thread runs meanwhile."""
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))


def test_a_worker_holding_the_gil_for_three_timeouts_is_not_dropped() -> None:
    keys = np.arange(20, dtype=np.uint64)
    with ps.LocalCluster(servers=2, workers=2, timeouts=TIMEOUTS) as cluster:
        a, b = cluster.connect(), cluster.connect()
        ta = a.sparse_table("w", dim=2, optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
        tb = b.sparse_table("w", dim=2, optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
        expected = np.zeros((20, 2), np.float32)
        for step in range(3):
            grads = np.full((20, 2), step + 1, np.float32)
            ta.push(keys, grads).result()
            tb.push(keys, 3 * grads).result()
            expected -= (grads + 3 * grads) / 2  # the sync mean of the two workers
            if step == 1:
                hold_the_gil(3 * TIMEOUTS.heartbeat_timeout)
            a.clock()
            b.clock()
        np.testing.assert_array_equal(ta.pull(keys), expected)
        np.testing.assert_array_equal(tb.pull(keys), expected)
        assert [state for _, state in a.view["workers"]] == ["alive", "alive"]


WORKER = """
import os, signal, sys
import numpy as np
import paramserver as ps
from tests import procs
from tests.timing import wait_until
t = ps.Timeouts(heartbeat_interval=0.1, heartbeat_timeout=1.0, request=20.0, connect=20.0)
client = ps.connect(sys.argv[1], timeouts=t)
client.sparse_table("w", dim=2, consistency="async").pull(np.arange(2))
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_stopped_worker_is_still_declared_dead_within_the_timeout() -> None:
    with ps.LocalCluster(servers=1, workers=2, timeouts=TIMEOUTS) as cluster:
        client = cluster.connect()
        table = client.sparse_table("w", dim=2, consistency="async")
        child = subprocess.Popen(
            [sys.executable, "-c", WORKER, cluster.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None and child.stderr is not None
            if child.stdout.readline() != b"ready\n":
                child.kill()
                pytest.fail(f"the worker failed: {child.stderr.read().decode()[-2000:]}")
            wait_until(lambda: procs.state(child.pid) == "T", 10, "the worker to stop")

            def declared_dead() -> bool:
                table.pull(np.arange(2))  # drives the client's sockets: views arrive
                return dict(client.view.get("workers", [])).get(1) == "dead"

            # what the test is about: found dead within 3 heartbeat timeouts although stopped
            wait_until(
                declared_dead, 3 * TIMEOUTS.heartbeat_timeout, "worker 1 declared dead", every=0.05
            )
        finally:
            child.kill()
            child.wait()
