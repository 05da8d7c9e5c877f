"""The coordinator can die: SIGKILLed mid-training, it is restarted on its address with its
journal, and the job goes on as if nothing happened. Real processes, nothing mocked."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import paramserver as ps
from tests.integration.test_recovery import view_of
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(120)

STEPS, KILL_AT = 30, 10


def train(kill: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Sync training of a sparse and a dense table; with ``kill``, the coordinator is
    SIGKILLed at step KILL_AT. The final weights and the number of coordinator restarts."""
    rng = np.random.default_rng(7)
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect(transport="tcp")
        sgd = ps.optim.SGD(lr=0.1)
        emb = client.sparse_table("emb", dim=4, optimizer=sgd, consistency="sync")
        w = client.dense_table("w", shape=(300_000,), optimizer=sgd, consistency="sync")
        keys = np.arange(64, dtype=np.uint64)
        for step in range(STEPS):
            if kill and step == KILL_AT:
                os.kill(cluster.pids["coordinator"], signal.SIGKILL)
            rows = emb.pull(keys)
            values = w.pull()
            emb.push(keys, rows * 0.5 + rng.standard_normal(rows.shape).astype(np.float32)).result()
            w.push(np.sin(values + step).astype(np.float32)).result()
            client.clock()
            if step in (KILL_AT, KILL_AT + 5):
                client.barrier()  # waits through the gap for the restarted coordinator
        if kill:
            wait_until(lambda: cluster.coordinator_restarts, 30, "the coordinator's restart")
            # the restarted coordinator knows the cluster: everyone alive, the tables, and
            # a table created now lands on the same servers
            view = view_of(cluster.address)
            assert [s[2] for s in view["servers"]] == ["alive", "alive"]  # type: ignore[index]
            assert [s[1] for s in view["workers"]] == ["alive"]  # type: ignore[index]
            assert sorted(t.name for t in client.tables()) == ["emb", "w"]
        return emb.pull(keys), w.pull(), len(cluster.coordinator_restarts) if kill else 0


def test_a_killed_coordinator_is_restarted_and_sync_training_ends_as_if_undisturbed() -> None:
    emb_ref, w_ref, _ = train(kill=False)
    emb, w, restarts = train(kill=True)
    assert restarts == 1
    np.testing.assert_array_equal(emb, emb_ref)
    np.testing.assert_array_equal(w, w_ref)
