"""Fixtures shared by the integration and end-to-end tests.

Every test that starts processes must leave none behind: the autouse fixture below fails a test
whose children (or their children) outlive it. Before the run, the bytecode of the tree is
compiled once (:func:`pytest_configure`).
"""

from __future__ import annotations

import compileall
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import paramserver as ps
from tests import hosts, procs
from tests.timing import FAST, wait_until

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Write the bytecode of the package, the tests and the benchmarks before any test starts.

    The suite starts many Python processes (three per LocalCluster, one per worker
    program and CLI command). Where PYTHONDONTWRITEBYTECODE is set, as on the machines this
    suite runs on, none of them keeps the bytecode it compiled, and each compiled the package's
    sources again at start: 0.15 CPU-s more per coordinator, 0.17 per server, 0.36 per worker
    of a ready program (``import paramserver.models.logreg``; user+sys of ``python -c "import
    paramserver.server.loop"`` and the like, best of 5). compileall writes it whatever that
    variable says; a file compiled before and unchanged since costs one stat.
    """
    for folder in ("paramserver", "tests", "benchmarks"):
        compileall.compile_dir(ROOT / folder, quiet=1)


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
