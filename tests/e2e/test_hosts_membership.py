"""Membership changes across emulated hosts (tests/hosts.py), in sync training: the program of
test_hosts_replication (tests/e2e/programs/hosts_replicated.py) on a coordinator host, two
server hosts and two worker hosts, started with README's "Many hosts" lines, and

* the coordinator SIGKILLed mid-training and started again by its supervisor (here the test) on
  its host, at its address, with its journal (``--journal``, docs/fault-tolerance.md "The
  coordinator dies");
* a server started on a new host against the running job at one clock (``paramserver server
  --coordinator ...``: it joins), and at a later clock another drained (``paramserver drain``);
* a server joining while the coordinator's messages to one worker host vanish (that one path
  cut: this kernel has no netem to delay it), so that the worker learns of the move from the
  sources only (docs/fault-tolerance.md, "Adding and removing servers", Limits).

Each run's final weights are compared bit for bit with one uninterrupted loopback run of the
same program, seed and data (``paramserver run -s 2 -w 2``), made once for the file."""

from __future__ import annotations

import random
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import hosts
from tests.e2e.test_hosts_replication import (
    PROGRAM,
    assert_bitwise,
    finish_reference,
    resume,
    start_reference,
    wait_paused,
)
from tests.e2e.test_many_hosts import Roles, bed, roles, shared_bed  # noqa: F401 (fixtures)

SEED = random.randrange(1 << 30)
STEPS = 12  # the program's
WORKERS = ["worker0", "worker1"]  # on h3 and h4; the coordinator on h0, servers on h1 and h2
JOINER, OPERATOR = 5, 6  # the hosts of a joining server and of `paramserver drain`


class Reference:
    """The uninterrupted loopback run every test of this file equals, started by the first
    test (with its roles' environment) while its own run goes on, and waited for once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.done = False

    def start(self, env: dict[str, str]) -> None:
        if self.proc is None:
            self.proc = start_reference(self.folder, env, SEED, 2)

    def check(self, spread: Path) -> None:
        """``spread``'s final weights are the reference's, bit for bit."""
        assert self.proc is not None
        if not self.done:
            finish_reference(self.proc, self.folder)
            self.done = True
        assert_bitwise(self.folder, spread)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.proc is not None and ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait(10)


def _train(
    make: Callable[[int, int], Roles], reference: Reference, pauses: str, **env: str
) -> tuple[Roles, str]:
    """The coordinator (with a journal), two servers and two workers on the bed, rank 0 pausing
    after each clock of ``pauses``; the reference started. The roles and the coordinator's
    command line."""
    print(f"seed {SEED}, rank 0 pauses at clocks {pauses}")
    r = make(2, 2)
    r.env.update(env)
    (r.folder / "train.py").write_bytes(PROGRAM.read_bytes())
    reference.start(r.env)
    line = f"{r.lines['coordinator']} --journal journal"
    r.start("coordinator", r.bed[0], line)
    for i in range(2):
        r.start(f"server{i}", r.bed[1 + i], r.lines["server"])
    for i, name in enumerate(WORKERS):
        r.start(name, r.bed[3 + i], f"{r.lines['worker']} sync {SEED} {pauses}")
    return r, line


def _finish(r: Roles, stop: list[str]) -> None:
    """The workers finish; the roles ``stop`` names stop on SIGTERM as a user stops them."""
    for name in WORKERS:
        r.finish(name, 120)
    for name in stop:
        r.stop(name)


# 6 processes on the bed (and the file's reference, 5 on loopback)
@pytest.mark.timeout(240)
def test_a_coordinator_killed_mid_training_and_restarted_by_its_supervisor_changes_no_bit(
    bed: hosts.Bed,  # noqa: F811
    roles: Callable[[int, int], Roles],  # noqa: F811
    reference: Reference,
) -> None:
    kill_at = random.Random(SEED).randrange(2, STEPS - 2)
    r, line = _train(roles, reference, str(kill_at))
    wait_paused(r, WORKERS, kill_at)
    coordinator = r.procs["coordinator"]
    coordinator.kill()  # SIGKILL: `sh -c exec` made the role's pid the coordinator's own
    assert coordinator.wait(10) == -9
    resume(r)  # the workers train on through the gap
    # its supervisor (systemd's Restart=always, say) starts it again: same host, address, journal
    r.start("coordinator2", bed[0], line)
    r.wait_line("coordinator2", r"coordinator restarted: view \d+, 2 tables", 60)
    # the workers end at a barrier of the coordinator's: only the restarted one can answer it
    _finish(r, ["server0", "server1", "coordinator2"])
    reference.check(r.folder)


# 8 processes on the bed
@pytest.mark.timeout(240)
def test_a_server_joining_at_one_clock_and_another_drained_at_a_later_one_change_no_bit(
    bed: hosts.Bed,  # noqa: F811
    roles: Callable[[int, int], Roles],  # noqa: F811
    reference: Reference,
) -> None:
    rnd = random.Random(SEED + 1)
    join_at = rnd.randrange(2, 5)
    drain_at = rnd.randrange(join_at + 2, STEPS - 2)
    r, _ = _train(roles, reference, f"{join_at},{drain_at}")
    wait_paused(r, WORKERS, join_at)
    r.start("joiner", bed[JOINER], r.lines["server"])  # against the running job: rank 2
    r.wait_line("coordinator", r"move \d+: join server\[2\], ring \[0, 1\] -> \[0, 1, 2\]", 60)
    resume(r)
    wait_paused(r, WORKERS, drain_at)
    # the join is over (both workers switched at their steps' ends since) before the drain
    r.wait_line("coordinator", r"move \d+ done .*: ring \[0, 1, 2\]$", 30)
    drain = bed[OPERATOR].popen(
        ["paramserver", "drain", "0", "--coordinator", f"{bed[0].name}:7070", "--timeout", "60"],
        cwd=r.folder, env={**r.env, "PS_TOKEN_FILE": "token"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    r.procs["drain"] = drain
    r.wait_line("coordinator", r"move \d+: drain server\[0\], ring \[0, 1, 2\] -> \[1, 2\]", 60)
    resume(r)
    out, _ = drain.communicate(timeout=90)
    assert drain.returncode == 0 and "server[0] drained: ring [1, 2]" in out, out
    # server[0] (the first to register, on h1 or h2) stopped once its keys and tables left
    drained = next(n for n in ("server0", "server1") if "server[0] serving" in r.log(n))
    r.finish(drained, 30)
    # no request failed: each worker exits 0 only if every pull, push, clock and barrier did
    _finish(r, [{"server0": "server1", "server1": "server0"}[drained], "joiner", "coordinator"])
    reference.check(r.folder)


def _switched_at(log: str) -> int:
    """The first clock a worker's log shows it routing by the ring [0, 1, 2] at (the ``CLOCK``
    line after the switch's log line, which its ``clock()`` wrote)."""
    after = log.split("routes by the ring of servers [0, 1, 2]", 1)
    assert len(after) == 2, log
    return int(re.search(r"^CLOCK (\d+)$", after[1], re.MULTILINE)[1])  # type: ignore[index]


# 6 processes on the bed
@pytest.mark.timeout(240)
def test_a_worker_that_hears_of_a_join_from_the_sources_only_switches_within_one_clock(
    bed: hosts.Bed,  # noqa: F811
    roles: Callable[[int, int], Roles],  # noqa: F811
    reference: Reference,
) -> None:
    """The move's view from the coordinator never reaches the late worker while the move goes
    on: the sources' copy of it must make that worker switch within one clock of the other,
    or the move would not end (and a sync pull could miss a push)."""
    join_at = random.Random(SEED + 2).randrange(2, STEPS - 3)
    # nothing dies here; the late worker must not give the silent coordinator up meanwhile
    r, _ = _train(roles, reference, str(join_at), PS_HEARTBEAT_TIMEOUT="60")
    lead = wait_paused(r, WORKERS, join_at)
    late = bed[3 + 1 - WORKERS.index(lead)]
    late.cut_path(bed[0])  # what the coordinator's host sends the late worker's host vanishes
    try:
        r.start("joiner", bed[JOINER], r.lines["server"])
        r.wait_line("coordinator", r"move \d+: join server\[2\]", 60)
        resume(r)
        # the move ends while the path is still cut: the late worker switched on the sources'
        # word alone (TCP sends the coordinator's lost messages once the path is back)
        r.wait_line("coordinator", r"move \d+ done .*: ring \[0, 1, 2\]", 20)
    finally:
        late.cut_path(bed[0], cut=False)
    _finish(r, ["server0", "server1", "joiner", "coordinator"])
    clocks = {name: _switched_at(r.log(name)) for name in WORKERS}
    print(f"switched at clocks {clocks} (rank 0 is {lead}, the late worker on {late.name})")
    assert abs(clocks["worker0"] - clocks["worker1"]) <= 1, clocks
    reference.check(r.folder)
