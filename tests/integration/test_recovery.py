"""Training through failures: real processes killed with SIGKILL, nothing mocked.

A killed worker is declared dead, its leases go back to the queue and a restarted worker rejoins
at the current clock; a killed server is restarted with its rank, restores its shards from the
newest checkpoint and the workers resend their requests to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from paramserver.wire.transport import Endpoint, new_context
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(120)
PROGRAM = str(Path(__file__).parent / "programs" / "lease_worker.py")


def view_of(address: str) -> dict[str, object]:
    ctx = new_context()
    ep = Endpoint(ctx, request_timeout=5.0)
    try:
        ep.connect("coordinator", address)
        view: dict[str, object] = ep.request(
            "coordinator", {"kind": "get_view"}, what="view"
        ).result(5.0)["view"]
        return view
    finally:
        ep.close()
        ctx.term()


def worker_state(address: str, rank: int) -> object:
    workers = view_of(address)["workers"]
    assert isinstance(workers, list)
    return dict(workers)[rank]


def wait_worker_state(address: str, rank: int, state: str, timeout: float) -> None:
    # the coordinator announces views to members only: a test outside the cluster asks for it
    wait_until(
        lambda: worker_state(address, rank) == state,
        timeout,
        f"worker[{rank}] to be {state}",
        every=0.05,
    )


def start_worker(address: str, rank: int, out: Path, shards: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, PROGRAM, address, str(rank), str(out), str(shards), "0.05"],
        stdout=subprocess.PIPE,
        env=env,
    )


def test_a_killed_worker_loses_no_shard_and_a_restarted_one_rejoins(tmp_path: Path) -> None:
    shards = 60
    with ps.LocalCluster(servers=2, workers=3, timeouts=FAST) as cluster:
        procs = {r: start_worker(cluster.address, r, tmp_path, shards) for r in range(3)}
        restarted: subprocess.Popen[bytes] | None = None
        try:
            victim = procs[2]
            done = tmp_path / f"done-2-{victim.pid}.txt"
            wait_until(
                lambda: done.exists() and len(done.read_text().split()) >= 3,
                60,
                "worker 2 to train 3 parts",
                every=0.01,
            )
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            wait_worker_state(cluster.address, 2, "dead", 20)
            restarted = start_worker(cluster.address, 2, tmp_path, shards)
            out, _ = restarted.communicate(timeout=60)
            assert restarted.returncode == 0, out.decode()
            start_clock = int(out.decode().split("start_clock ")[1].split()[0])
            for r in (0, 1):
                procs[r].communicate(timeout=60)
                assert procs[r].returncode == 0
        finally:
            for p in [*procs.values(), restarted]:
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    trained = [int(x) for f in tmp_path.glob("done-*.txt") for x in f.read_text().split()]
    assert set(trained) == set(range(shards))  # the whole epoch, despite the kill
    assert start_clock >= 3  # it rejoined at the cluster's clock, not at 0
    print(f"restarted worker rejoined at clock {start_clock}; {len(trained)} shard trainings")


@pytest.mark.parametrize("transport", ["tcp", "auto"])  # auto: dense over shared memory
def test_a_killed_server_is_replaced_and_training_goes_on(tmp_path: Path, transport: str) -> None:
    steps, kill_at = 60, 20
    with ps.LocalCluster(
        servers=2,
        workers=1,
        timeouts=FAST,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_every=0.3,
    ) as cluster:
        client = cluster.connect(transport=transport)
        emb = client.sparse_table("emb", dim=8, optimizer=ps.optim.SGD(lr=0.1), consistency="sync")
        dense = client.dense_table(
            "w", shape=(1000,), optimizer=ps.optim.SGD(lr=0.1), consistency="sync"
        )
        old_pid = client.stats()[1]["pid"]
        killed_at = recovered = 0.0
        kill_step = -1
        for step in range(steps):
            # the kill waits for a first checkpoint, while training goes on: a checkpoint is
            # taken at a clock ahead of the current one, so a worker that stopped would wait
            # for it forever
            if kill_step < 0 and step >= kill_at and (tmp_path / "ckpt" / "LATEST").exists():
                os.kill(old_pid, signal.SIGKILL)
                killed_at = time.monotonic()
                kill_step = step
            assert kill_step >= 0 or step < steps - 20, "no checkpoint was written"
            # a new key list each step (the key cache is for async/ssp tables)
            # large enough for shared-memory slots under "auto" (64 KiB of rows per server)
            keys = np.arange(step, step + 4000, dtype=np.uint64)
            rows = emb.pull(keys)
            w = dense.pull()
            f1 = emb.push(keys, np.ones_like(rows))
            f2 = dense.push(np.ones_like(w))
            f1.result()
            f2.result()
            client.clock()
            if step == kill_step:
                recovered = time.monotonic()
        stats = client.stats()
        assert client.current_clock == steps
        assert stats[1]["pid"] != old_pid  # a new process holds rank 1
        assert [r for r, _ in cluster.restarts] == [1]
        assert stats[1]["tables"]["emb"]["rows"] > 0  # its keys came back from the checkpoint
        # every step after the kill was applied: each lowers the values by lr * 1
        after = dense.pull()
        assert np.all(after < -0.1 * (steps - kill_step))
        assert dense.shared_memory == (transport == "auto")
        if transport == "auto":  # the replacement got slots of its own, and used them
            made, pool = client._slot_pools[1]
            assert made == client.replaced[1] >= 1
            assert pool.used > 0 and pool.slots
    print(f"server recovery: training moved again {recovered - killed_at:.2f}s after SIGKILL")
