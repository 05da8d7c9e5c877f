"""Replication (``--replication 2``) across emulated hosts (tests/hosts.py): a coordinator on one
host, three servers on three more, two workers on two more; a whole server host is taken away
(every process in it SIGKILLed, its link down) at a random clock, and no one starts its rank
again: the job completes on the live copies.

* sync: the final weights, read with pulls, are bitwise equal to those of the same program
  (tests/e2e/programs/hosts_replicated.py) under ``paramserver run`` on loopback, replication 1,
  uninterrupted, same seed and data;
* async (SGD lr 1 of all-ones gradients): every value is minus the number of acknowledged
  pushes that held it, counted by the workers (none lost, none applied twice).

The bed and the roles' command lines are those of test_many_hosts (README's "Many hosts")."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests import hosts
from tests.e2e.test_many_hosts import Roles, bed, roles, shared_bed  # noqa: F401 (fixtures)
from tests.timing import wait_until

PROGRAM = Path(__file__).parent / "programs" / "hosts_replicated.py"
STEPS, KEYS, DIM, DENSE = 12, 600, 8, 3000  # the program's
SERVER_HOSTS, WORKER_HOSTS = (1, 2, 3), (4, 5)


def wait_paused(r: Roles, workers: list[str], clock: int) -> str:
    """Wait until rank 0 printed ``PAUSED clock`` (failing if any worker exited); its role."""
    paused = rf"^PAUSED {clock}$"
    found: list[str] = []

    def rank0_paused() -> bool:
        for name in workers:
            if r.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited {r.procs[name].returncode}:\n{r.log(name)}")
        found[:] = [n for n in workers if re.search(paused, r.log(n), re.MULTILINE)]
        return bool(found)

    wait_until(rank0_paused, 120, f"rank 0 to pause at clock {clock}", every=0.05)
    return found[0]


def resume(r: Roles) -> None:
    """Let rank 0 go on from its pause."""
    (r.folder / "resume").touch()


def start_reference(
    folder: Path, env: dict[str, str], seed: int, servers: int
) -> subprocess.Popen[bytes]:
    """The program in ``folder`` under ``paramserver run`` on loopback (two workers, sync, seed,
    never paused, replication 1): the uninterrupted run a disturbed one must equal bitwise."""
    folder.mkdir(exist_ok=True)
    (folder / "train.py").write_bytes(PROGRAM.read_bytes())
    with open(folder / "run.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "paramserver", "run", "-s", str(servers), "-w", "2",
             "train.py", "sync", str(seed), "-1"],
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def finish_reference(proc: subprocess.Popen[bytes], folder: Path) -> None:
    """Wait for the reference run (killed after 120 s); it must exit 0."""
    try:
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 0, (folder / "run.log").read_text()


def assert_bitwise(reference: Path, spread: Path) -> None:
    """Every worker's final rows and dense values in ``spread`` are those of ``reference``, bit
    for bit."""
    for rank in range(len(WORKER_HOSTS)):
        want, got = _final(reference, rank), _final(spread, rank)
        assert sorted(got) == sorted(want) == ["emb", "w"], (got, want)
        for name in want:
            assert got[name].dtype == want[name].dtype == np.float32, name
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} of {rank}")
            assert got[name].tobytes() == want[name].tobytes(), name  # bitwise
    assert _final(spread, 0)["emb"].shape == (KEYS, DIM)


def _run_on_hosts(r: Roles, mode: str, seed: int, pause_at: int, victim: hosts.Host) -> None:
    """The program on the bed, replication 2; ``victim`` taken away when rank 0 has paused at
    clock ``pause_at``; the workers must finish, the live servers and the coordinator stop on
    SIGTERM."""
    machines = r.bed
    r.start("coordinator", machines[0], f"{r.lines['coordinator']} --replication 2")
    servers = [f"server{i}" for i in range(len(SERVER_HOSTS))]
    workers = [f"worker{i}" for i in range(len(WORKER_HOSTS))]
    for name, h in zip(servers, SERVER_HOSTS, strict=True):
        r.start(name, machines[h], r.lines["server"])
    for name, h in zip(workers, WORKER_HOSTS, strict=True):
        r.start(name, machines[h], f"{r.lines['worker']} {mode} {seed} {pause_at}")
    wait_paused(r, workers, pause_at)
    victim.kill()  # every process in it SIGKILLed, then its link down
    resume(r)
    for name in workers:
        r.finish(name, 120)
    # the job completed without the victim's rank: declared dead, started again by no one
    dead = rf"server\[(\d)\] \(tcp://{victim.name}:\d+\) declared dead"
    assert re.search(dead, r.log("coordinator")), r.log("coordinator")
    for name, h in zip(servers, SERVER_HOSTS, strict=True):
        if machines[h] is not victim:
            r.stop(name)
    r.stop("coordinator")


def _final(folder: Path, rank: int) -> dict[str, np.ndarray]:
    with np.load(folder / f"final{rank}.npz") as f:
        return {k: f[k] for k in f.files}


# 6 processes on the bed and 6 on loopback, one Python start each: about 20 s on 2 loaded cores
@pytest.mark.timeout(240)
def test_sync_training_through_a_server_host_taken_away_is_bitwise_equal(
    bed: hosts.Bed,  # noqa: F811
    tmp_path: Path,
    roles: Callable[[int, int], Roles],  # noqa: F811
) -> None:
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    pause_at, victim = rnd.randrange(2, STEPS - 1), bed[rnd.choice(SERVER_HOSTS)]
    print(f"seed {seed}: {victim.name} taken away at clock {pause_at}")
    reference, spread = tmp_path / "reference", tmp_path  # the bed's roles run in tmp_path
    (spread / "train.py").write_bytes(PROGRAM.read_bytes())
    r = roles(len(SERVER_HOSTS), len(WORKER_HOSTS))
    # the reference runs meanwhile: an uninterrupted loopback cluster without replication
    ref = start_reference(reference, r.env, seed, len(SERVER_HOSTS))
    try:
        _run_on_hosts(r, "sync", seed, pause_at, victim)
    finally:
        finish_reference(ref, reference)
    assert_bitwise(reference, spread)


# 6 processes on the bed: about 10 s on 2 loaded cores
@pytest.mark.timeout(240)
def test_async_no_acknowledged_push_is_lost_when_a_server_host_is_taken_away(
    bed: hosts.Bed,  # noqa: F811
    tmp_path: Path,
    roles: Callable[[int, int], Roles],  # noqa: F811
) -> None:
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    pause_at, victim = rnd.randrange(2, STEPS - 1), bed[rnd.choice(SERVER_HOSTS)]
    print(f"seed {seed}: {victim.name} taken away at clock {pause_at}")
    (tmp_path / "train.py").write_bytes(PROGRAM.read_bytes())
    r = roles(len(SERVER_HOSTS), len(WORKER_HOSTS))
    _run_on_hosts(r, "async", seed, pause_at, victim)
    finals = [_final(tmp_path, rank) for rank in range(len(WORKER_HOSTS))]
    counts = sum(f["counts"] for f in finals)
    acks = sum(int(f["dense_acks"]) for f in finals)
    assert acks == STEPS * len(WORKER_HOSTS), acks  # every push acknowledged in the end
    assert counts.sum() == 200 * acks, counts.sum()
    for rank, f in enumerate(finals):
        # each key: minus its acknowledged pushes (after the barrier: all of both workers')
        want = -np.repeat(counts[:, None], DIM, axis=1).astype(np.float32)
        np.testing.assert_array_equal(f["emb"], want, err_msg=f"rows pulled by rank {rank}")
        np.testing.assert_array_equal(f["w"], np.full(DENSE, -acks, np.float32))
