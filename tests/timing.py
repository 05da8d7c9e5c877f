"""How long the tests wait: the one set of short timeouts (``FAST``) the clusters of the tests
run with, the same as command-line flags and environment variables, and ``wait_until``, the one
polling wait, for the conditions no event announces.

A test that needs other timeouts derives them from ``FAST`` with ``dataclasses.replace`` and says
why. Prefer waiting on the event itself (a future's result, a process's exit, a line of output);
poll only where there is none.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import paramserver as ps

FAST = ps.Timeouts(heartbeat_interval=0.2, heartbeat_timeout=2.0, request=30.0, connect=30.0)

# FAST's heartbeat for a process started from the command line or by a launcher
FAST_FLAGS = [
    "--heartbeat-interval",
    f"{FAST.heartbeat_interval:g}",
    "--heartbeat-timeout",
    f"{FAST.heartbeat_timeout:g}",
]
FAST_ENV = {
    "PS_HEARTBEAT_INTERVAL": f"{FAST.heartbeat_interval:g}",
    "PS_HEARTBEAT_TIMEOUT": f"{FAST.heartbeat_timeout:g}",
}


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, *, every: float = 0.02
) -> None:
    """Return once ``predicate()`` is true; fail naming ``what`` if it is not within ``timeout``
    seconds. Whatever ``predicate`` raises goes through (a test may wait for an error).

    Example:
        wait_until(lambda: procs.state(child.pid) == "T", 10, "the worker to stop")
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)
