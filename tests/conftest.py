"""Fixtures shared by the integration and end-to-end tests.

Every test that starts processes must leave none behind: the autouse fixture below fails a test
whose children (or their children) outlive it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import paramserver as ps
from tests import hosts


def descendants(pid: int | None = None) -> set[int]:
    """Pids of every live descendant of ``pid`` (default: this process), read from /proc."""
    root = os.getpid() if pid is None else pid
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie is already dead, just not reaped
            continue
        parent_of[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {p for p, pp in parent_of.items() if pp in frontier} - found
        found |= frontier
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    before = descendants()
    yield
    deadline = time.monotonic() + 5.0
    left = descendants() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = descendants() - before
    for pid in left:  # do not let one leak poison the rest of the run
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind by the test: {sorted(left)}"


FAST = ps.Timeouts(heartbeat_interval=0.2, heartbeat_timeout=2.0, request=30.0, connect=30.0)


@pytest.fixture
def fast_timeouts() -> ps.Timeouts:
    return FAST


@pytest.fixture
def cluster() -> Iterator[ps.LocalCluster]:
    """A 2-server, 1-worker local cluster with short heartbeat timeouts."""
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST) as c:
        yield c


@pytest.fixture
def emulated_hosts() -> Iterator[Callable[..., hosts.Bed]]:
    """Makes beds of emulated hosts (``emulated_hosts(3, rate="1gbit")``, see tests/hosts.py)
    and removes them, with every process in them, after the test. Skips the test, saying why,
    where they cannot be made (not root, no ``ip`` / ``tc``)."""
    reason = hosts.unavailable()
    if reason is not None:
        pytest.skip(reason)
    beds: list[hosts.Bed] = []

    def make(count: int, **kwargs: Any) -> hosts.Bed:
        bed = hosts.up(count, **kwargs)
        beds.append(bed)
        return bed

    yield make
    errors = []
    for bed in beds:
        try:
            bed.close()
        except hosts.BedError as exc:
            errors.append(str(exc))
    assert not errors, errors
