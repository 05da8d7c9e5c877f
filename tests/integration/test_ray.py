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


def _run_ray(*flags: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paramserver.cli", "run", "--backend", "ray", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_backend_ray_honours_token_checkpoints_and_restore(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-cluster-token-of-this-test\n")
    root = tmp_path / "ckpt"
    program = str(PROGRAMS / "ray_flags.py")
    first = _run_ray(
        "-s", "1", "-w", "1", "--token-file", str(token), "--checkpoint-dir", str(root),
        "--checkpoint-every", "0.5", "--checkpoint-every-clocks", "2",
        program, "train", str(token), str(root),
    )  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "OK train 0" in first.stdout
    second = _run_ray(
        "-s", "2", "-w", "1", "--token-file", str(token), "--restore", str(root),
        program, "check", str(token), str(root),
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "OK check 0" in second.stdout


def test_run_backend_ray_refuses_resources_it_cannot_give() -> None:
    got = _run_ray("-s", "1", "-w", "2", "--worker-gpus", "1", str(PROGRAMS / "basic.py"))
    assert got.returncode == 2, got.stdout[-3000:] + got.stderr[-3000:]
    assert "2 workers with --worker-gpus 1 need 2 GPU in all" in got.stderr, got.stderr


def test_resource_flags_are_for_the_ray_backend_only() -> None:
    got = subprocess.run(
        [sys.executable, "-m", "paramserver.cli", "run", "--worker-cpus", "2",
         str(PROGRAMS / "basic.py")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 2 and "--worker-cpus apply to --backend ray only" in got.stderr


def _assigned(client: ps.Client) -> dict[str, float]:
    return dict(ray.get_runtime_context().get_assigned_resources())


def test_launch_gives_each_role_its_resources(local_ray: None) -> None:
    got = ps.ray.launch(
        _assigned,
        servers=1,
        workers=2,
        timeouts=RAY,
        timeout=240,
        server_resources=ps.ray.Resources(cpus=1),
        worker_resources=ps.ray.Resources(cpus=2, memory=ps.ray.parse_memory("64Mi")),
    )
    assert got == [{"CPU": 2.0, "memory": 64 * 2**20}] * 2
    assert ps.ray.parse_memory("1.5G") == 1_500_000_000
    with pytest.raises(ps.errors.ConfigError, match="a size such as"):
        ps.ray.parse_memory("lots")


def test_run_backend_ray_refuses_a_missing_program_before_starting_ray(tmp_path: Path) -> None:
    got = _run_ray("-s", "1", "-w", "1", str(tmp_path / "missing.py"), timeout=60)
    assert got.returncode == 2 and "missing.py' is not a file" in got.stderr, got.stderr
