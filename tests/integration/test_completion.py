"""A job that ends by itself: ``paramserver coordinator --exit-when-done`` and servers started
the way the Kubernetes manifest starts them (real processes on loopback, nothing mocked).

Once every worker trained and closed, the coordinator writes a final checkpoint, stops the
servers and exits; every process exits 0 by itself. A worker killed with SIGKILL does not end
the job while it could still be restarted (within the restart grace): a restarted worker takes
its rank back, trains, and its updates are in the final checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.timing import FAST_FLAGS, wait_until

pytestmark = pytest.mark.timeout(180)

LR, KEYS = 0.1, 10

# A worker as a user writes one: connect, train STEPS steps (a push of ones to keys 0..9 and
# a clock each), then close; with HANG it stays alive after its steps (to be killed).
WORKER = f"""
import sys, time
import numpy as np
import paramserver as ps
from tests.timing import FAST
address, rank, steps, hang = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
client = ps.connect(address, rank=rank, timeouts=FAST, transport="tcp")
emb = client.sparse_table("emb", dim=4, optimizer=ps.optim.SGD(lr={LR!r}))
keys = np.arange({KEYS}, dtype=np.uint64)
for _ in range(steps):
    emb.push(keys, np.ones((len(keys), 4), np.float32)).result()
    client.clock()
print("trained", client.current_clock, flush=True)
if hang:
    time.sleep(600)
client.close()
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_cluster(
    servers: int, workers: int, ckpt: Path | None, grace: float, log: Path
) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """The coordinator (its log into ``log``) and the servers, with the manifest's commands
    (loopback, no token)."""
    address = f"127.0.0.1:{free_port()}"
    cli = [sys.executable, "-m", "paramserver.cli"]
    with log.open("wb") as f:
        coordinator = subprocess.Popen(
            [*cli, "coordinator", "--bind", address, "-s", str(servers), "-w", str(workers),
             *(["--checkpoint-dir", str(ckpt), "--checkpoint-every", "3600"] if ckpt else []),
             "--exit-when-done", "--restart-grace", str(grace), *FAST_FLAGS],
            env=env(), stderr=f,
        )  # fmt: skip
    procs = [coordinator]
    for rank in range(servers):
        procs.append(
            subprocess.Popen(
                [*cli, "server", "--coordinator", address, "--rank", str(rank), *FAST_FLAGS],
                env=env(),
            )
        )
    return address, procs


def start_worker(address: str, rank: int, steps: int, hang: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, address, str(rank), str(steps), "1" if hang else "0"],
        env=env(),
        stdout=subprocess.PIPE,
        text=True,
    )


def stop_all(procs: list[Any]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        if getattr(p, "stdout", None) is not None:
            p.stdout.close()


def final_checkpoint(ckpt: Path) -> tuple[int, np.ndarray]:
    """The newest checkpoint's clock and the rows of table ``emb`` for keys 0..KEYS-1, read
    from its files (the manifest and every server's index)."""
    directory = ckpt / (ckpt / "LATEST").read_text().strip()
    manifest = json.loads((directory / "manifest.json").read_text())
    rows = np.full((KEYS, 4), np.nan)
    for r in range(manifest["num_servers"]):
        base = directory / f"server-{r}"
        entry = json.loads((base / "index.json").read_text())["tables"].get("emb")
        if entry is not None:
            keys = np.load(base / entry["keys"])
            rows[keys.astype(np.int64)] = np.load(base / entry["rows"])[:, :4]
    return int(manifest["clock"]), rows


@pytest.mark.parametrize("checkpoints", [True, False])
def test_the_job_ends_by_itself_with_a_final_checkpoint(tmp_path: Path, checkpoints: bool) -> None:
    ckpt = tmp_path / "ckpt" if checkpoints else None
    address, procs = start_cluster(
        servers=2, workers=2, ckpt=ckpt, grace=30.0, log=tmp_path / "log"
    )
    workers = [start_worker(address, rank, steps=3) for rank in range(2)]
    try:
        for w in workers:
            assert w.wait(timeout=120) == 0
        # nobody stops them: the coordinator ends the job once both workers left
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    finally:
        stop_all(procs + workers)
    if ckpt is None:  # no checkpoint policy: no final round, the servers are stopped at once
        return
    clock, rows = final_checkpoint(ckpt)
    # the final checkpoint holds every update: 2 workers x 3 pushes of ones at lr 0.1
    assert clock == 3
    np.testing.assert_allclose(rows, np.full((KEYS, 4), -LR * 6), rtol=1e-6)


def test_a_killed_worker_does_not_end_the_job_within_the_grace(tmp_path: Path) -> None:
    address, procs = start_cluster(
        servers=1, workers=2, ckpt=tmp_path / "ckpt", grace=60.0, log=tmp_path / "log"
    )
    done = start_worker(address, 0, steps=3)
    killed = start_worker(address, 1, steps=1, hang=True)
    workers = [done, killed]
    try:
        assert killed.stdout is not None
        assert killed.stdout.readline().startswith("trained")
        assert done.wait(timeout=120) == 0
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        log = tmp_path / "log"
        wait_until(
            lambda: "worker[1] declared dead" in log.read_text(), 60, "worker[1] declared dead"
        )
        # every worker is now gone, one of them dead: inside the grace the job goes on
        assert all(p.poll() is None for p in procs)
        restarted = start_worker(address, 1, steps=2)
        workers.append(restarted)
        assert restarted.wait(timeout=120) == 0
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        stop_all(procs + workers)
    _, rows = final_checkpoint(tmp_path / "ckpt")
    # 3 + 1 + 2 pushes: the restarted worker's too, so the job had not ended when it came back
    np.testing.assert_allclose(rows, np.full((KEYS, 4), -LR * 6), rtol=1e-6)
