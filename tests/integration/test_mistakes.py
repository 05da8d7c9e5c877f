"""Mistakes that used to stay silent: a sync loop without ``clock()``, a worker that never
clocks, a worker that exits without ``close()``, a misspelt table name. Each is said, once,
in words that name the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from tests.timing import FAST

PROGRAM = str(Path(__file__).parent / "programs" / "mistakes_worker.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

pytestmark = pytest.mark.timeout(120)


def test_sync_loop_without_clock_is_warned_once() -> None:
    got = subprocess.run(
        [sys.executable, "-m", "paramserver.cli", "run", "-s", "1", "-w", "1", PROGRAM, "noclock"],
        capture_output=True, text=True, timeout=100, env=ENV,
    )  # fmt: skip
    out = got.stdout + got.stderr
    assert got.returncode == 0, out
    # the mistake itself: its pushes are never applied
    assert "rows [[0.0, 0.0], [0.0, 0.0]]" in out, out
    assert out.count("does not see worker[0]'s pushes of clock 0") == 1, out
    assert "worker has called client.clock()" in out


def test_sync_pull_timeout_asks_whether_the_laggard_called_clock() -> None:
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        fast, slow = cluster.connect(rank=0), cluster.connect(rank=1)
        emb = fast.sparse_table("emb", dim=2, consistency="sync")
        slow.sparse_table("emb", dim=2, consistency="sync")
        keys = np.array([1], dtype=np.uint64)
        emb.push(keys, np.ones((1, 2), np.float32)).result()
        fast.clock()
        with pytest.raises(ps.errors.RemoteError) as err:
            emb.pull(keys, timeout=1.0)  # worker[1] never calls clock()
        assert "did worker[1] call clock()?" in str(err.value), err.value
        assert err.value.code == "timeout"


def test_worker_exiting_without_close_leaves_at_exit() -> None:
    # a heartbeat timeout far beyond the barrier's: only the exiting worker's leave can let
    # the barrier complete
    slow_death = replace(FAST, heartbeat_timeout=300.0)
    with ps.LocalCluster(servers=1, workers=2, timeouts=slow_death) as cluster:
        client = cluster.connect(rank=0)
        got = subprocess.run(
            [sys.executable, PROGRAM, "noclose"],
            capture_output=True, text=True, timeout=60,
            env={**ENV, "PS_COORDINATOR": cluster.address, "PS_RANK": "1"},
        )  # fmt: skip
        assert got.returncode == 0 and "joined as 1" in got.stdout, got.stdout + got.stderr
        client.barrier(timeout=20)  # worker[1] left: the barrier does not wait for it


def test_table_lookup_opens_existing_and_names_them_on_a_typo() -> None:
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST) as cluster:
        a, b = cluster.connect(rank=0), cluster.connect(rank=1)
        emb = a.sparse_table("user_emb", dim=3, optimizer=ps.optim.SGD(lr=1.0))
        a.dense_table("bias", shape=(4,))
        keys = np.array([5], dtype=np.uint64)
        emb.push(keys, np.ones((1, 3), np.float32)).result()
        opened = b.table("user_emb")
        assert isinstance(opened, ps.client.SparseTable) and opened.spec == emb.spec
        np.testing.assert_array_equal(opened.pull(keys), [[-1.0, -1.0, -1.0]])
        assert b.table("bias").spec.kind == "dense"
        with pytest.raises(ps.errors.ConfigError) as err:
            b.table("user_embb")
        msg = str(err.value)
        assert "no table 'user_embb'" in msg and "did you mean 'user_emb'?" in msg, msg
        assert "Tables: 'bias', 'user_emb'" in msg, msg
        assert sorted(t.name for t in b.tables()) == ["bias", "user_emb"]  # nothing created
