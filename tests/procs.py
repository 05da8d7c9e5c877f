"""The tests' one view of the process tree, read from /proc: a process's state, its live
descendants (with start times, so that a reused pid is not mistaken for one seen before),
whether they are gone, and what they were run as.

Used by the conftest's no-leftover check, the launcher's end-to-end tests and every test that
waits for a process to stop or to vanish. (tests/hosts.py finds a bed's processes by namespace,
not by parentage, and keeps its own scan.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from typing import NamedTuple


class Stat(NamedTuple):
    """What /proc/PID/stat says of a process: its state letter (``R``, ``S``, ``T`` stopped,
    ``Z`` zombie, ...), its parent and its start time (clock ticks since boot)."""

    state: str
    parent: int
    start: int


def stat(pid: int) -> Stat | None:
    """``pid``'s :class:`Stat`, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
    except (OSError, IndexError):
        return None
    return Stat(fields[0], int(fields[1]), int(fields[19]))


def state(pid: int) -> str | None:
    """``pid``'s state letter (``T``: stopped), or None if there is no such process."""
    st = stat(pid)
    return None if st is None else st.state


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie has: it is only not reaped yet)."""
    return state(pid) in (None, "Z")


def descendants(root: int | None = None) -> dict[int, int]:
    """Every live (non-zombie) descendant of ``root`` (default: this process): pid -> start."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = stat(int(entry))
            if st is not None and st.state != "Z":
                children.setdefault(st.parent, []).append((int(entry), st.start))
    found: dict[int, int] = {}
    frontier = [os.getpid() if root is None else root]
    while frontier:
        pid = frontier.pop()
        for child, start in children.get(pid, []):
            if child not in found:
                found[child] = start
                frontier.append(child)
    return found


def alive(procs: dict[int, int]) -> list[int]:
    """Those of ``procs`` (pid -> start time) that still run: same pid, same start, no zombie."""
    found = []
    for pid, start in procs.items():
        st = stat(pid)
        if st is not None and st.state != "Z" and st.start == start:
            found.append(pid)
    return found


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def cmdline(pid: int) -> str:
    """``pid``'s command line, its arguments joined by spaces ("" if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def has_sockets(pid: int) -> bool:
    """Whether ``pid`` has a socket open (False if it is gone)."""
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


def kill(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that still exists (one leak must not poison the rest of a run)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_fresh(code: str, timeout: float = 600) -> None:
    """Run ``code`` in a fresh interpreter (this checkout first on its path), where nothing was
    imported or compiled before; it must print ``ok`` and exit 0."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
