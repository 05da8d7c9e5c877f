"""Fixtures shared by the integration and end-to-end tests.

Every test that starts processes must leave none behind: the autouse fixture below fails a test
whose children (or their children) outlive it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import paramserver as ps
from tests import hosts, procs
from tests.timing import FAST, wait_until


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    before = procs.descendants()
    left: list[int] = []

    def none_left() -> bool:
        nonlocal left
        left = [pid for pid, start in procs.descendants().items() if before.get(pid) != start]
        return not left

    with contextlib.suppress(AssertionError):
        wait_until(none_left, 5.0, "the test's processes to exit", every=0.05)
    procs.kill(left)  # do not let one leak poison the rest of the run
    assert not left, f"processes left behind by the test: {sorted(left)}"


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
