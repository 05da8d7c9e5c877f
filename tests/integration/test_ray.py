"""The Ray backend on a local Ray instance started inside the test, bound to 127.0.0.1: a cluster
of actors trains, ``paramserver run --backend ray`` runs a program per worker actor."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import paramserver as ps
from tests.timing import FAST

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'paramserver[ray]')")

PROGRAMS = Path(__file__).parents[1] / "e2e" / "programs"
# FAST with the longer heartbeat and connect timeouts this test has always run with (Ray
# starts its actors slowly)
RAY = replace(FAST, heartbeat_timeout=5.0, connect=60.0)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def local_ray() -> Iterator[None]:
    ray.init(
        num_cpus=6,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def train(client: ps.Client, steps: int) -> tuple[int, list[float]]:
    emb = client.sparse_table("emb", dim=2, optimizer=ps.optim.SGD(lr=1.0), consistency="sync")
    keys = np.array([5, 6], dtype=np.uint64)
    for _ in range(steps):
        emb.push(keys, np.ones((2, 2), np.float32)).result(30)
        client.clock()
    client.barrier(timeout=60)
    return client.rank, [float(v) for v in emb.pull(keys)[:, 0]]


def test_launch_places_roles_as_actors_and_trains(local_ray: None) -> None:
    results = ps.ray.launch(train, servers=2, workers=2, args=(3,), timeouts=RAY, timeout=240)
    assert [r for r, _ in results] == [0, 1]
    # sync SGD with lr 1 from zero rows: each of the 3 clocks subtracts the mean of the two
    # workers' gradients (1.0)
    assert results[0][1] == results[1][1] == [-3.0, -3.0]


def test_ray_backend_refuses_open_bind_without_token() -> None:
    with pytest.raises(ps.errors.ConfigError, match="without a cluster token"):
        ps.ray.launch(train, host="0.0.0.0", args=(1,))


def test_paramserver_run_backend_ray() -> None:
    # the command starts (and stops) its own local Ray instance on 127.0.0.1
    got = subprocess.run(
        [
            sys.executable, "-m", "paramserver.cli", "run", "--backend", "ray",
            "-s", "1", "-w", "2", str(PROGRAMS / "basic.py"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    assert "worker[0] rank 0 of 2" in got.stdout
    assert "worker[1] rank 1 of 2" in got.stdout
