"""Process supervision: the children one launcher started, their output, and their end.

Every process started here is stopped when its parent stops: on success, on error and on
Ctrl-C. Children get ``PR_SET_PDEATHSIG`` (Linux) so that even a parent killed with SIGKILL
takes them along, and they exit at once if their parent is already gone when they start.

Linux sends that signal when the *thread* that started a child exits, not the process: start
children from the main thread, or from a thread that outlives them.

Children start with SIGINT ignored: Ctrl-C in a terminal signals the whole process group, and
the launcher alone answers it, by stopping its children in order (SIGTERM, or the
coordinator's shutdown). Otherwise every worker would print a ``KeyboardInterrupt`` traceback
and every server stop by itself, looking like a crash to the launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

__all__ = ["Children", "describe_exit", "die_with_parent", "exit_code", "guard_parent", "say"]

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[[int, int], int] | None:
    try:
        fn: Callable[[int, int], int] = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return fn


# Looked up once, in the parent: a child between fork and exec must not dlopen (another
# thread of the parent may have held the loader's lock at the fork).
_prctl = _load_prctl() if sys.platform.startswith("linux") else None


# ---- the child side ------------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits (Linux only). Safe between
    fork and exec (no import, no lock).

    Example:
        subprocess.Popen(cmd, preexec_fn=die_with_parent)
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def guard_parent(parent_pid: int | None) -> None:
    """In a role started by a launcher (``parent_pid``): die with it, and exit at once if it
    is already gone."""
    if parent_pid is None:
        return
    die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)


# ---- output ----------------------------------------------------------------------------------

# One lock for every line written on behalf of children, so lines never interleave mid-line.
_output_lock = threading.Lock()


def say(out: IO[str], line: str) -> None:
    """Write one line of the launcher's own to ``out`` (never raises: output is best effort)."""
    with contextlib.suppress(OSError, ValueError), _output_lock:
        out.write(line + "\n")
        out.flush()


def _pump(stream: IO[bytes], prefix: str, out: IO[str]) -> None:
    """Copy lines from a child's pipe to ``out``, each prefixed with its role and rank.

    If ``out`` breaks (a closed pipe: ``paramserver run ... | head``) the lines are still read
    and dropped, so that the child never blocks on a full pipe.
    """
    broken = False
    for raw in iter(stream.readline, b""):
        if broken:
            continue
        line = raw.decode(errors="replace").rstrip("\r\n")
        try:
            with _output_lock:
                out.write(f"{prefix} {line}\n")
                out.flush()
        except (OSError, ValueError):
            broken = True
    stream.close()


# ---- exit codes ------------------------------------------------------------------------------


def exit_code(rc: int) -> int:
    """A child's return code as a shell reports it: -N (killed by signal N) becomes 128 + N."""
    return rc if rc >= 0 else 128 - rc


def describe_exit(rc: int) -> str:
    """``exit code 3`` or ``signal SIGKILL``: how a child ended, for a log line."""
    if rc >= 0:
        return f"exit code {rc}"
    try:
        return f"signal {signal.Signals(-rc).name}"
    except ValueError:
        return f"signal {-rc}"


# ---- the children ----------------------------------------------------------------------------


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))


class Children:
    """The processes one launcher started, and the threads that copy their output.

    Example:
        children = Children()
        children.start("worker 0", [sys.executable, "train.py"], prefix_output=sys.stdout)
        children.stop(grace=1.0)
    """

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.pumps: list[threading.Thread] = []

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        prefix_output: IO[str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> subprocess.Popen[bytes]:
        piped = prefix_output is not None
        parent = os.getpid()

        def in_child() -> None:  # between fork and exec: no imports, no locks
            # inherited through exec; Python then installs no KeyboardInterrupt handler
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            die_with_parent()
            if os.getppid() != parent:  # the launcher died before prctl took effect
                os._exit(1)

        proc = subprocess.Popen(
            list(cmd),
            env=env,
            pass_fds=tuple(pass_fds),
            stdout=subprocess.PIPE if piped else None,
            stderr=subprocess.STDOUT if piped else None,
            stdin=subprocess.DEVNULL,
            preexec_fn=in_child,
        )
        self.procs.append((name, proc))
        if piped:
            assert proc.stdout is not None and prefix_output is not None
            t = threading.Thread(
                target=_pump, args=(proc.stdout, f"[{name}]", prefix_output), daemon=True
            )
            t.start()
            self.pumps.append(t)
        return proc

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for _, p in self.procs if p.poll() is None]

    def signal(self, signum: int) -> None:
        for p in self.alive():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)

    def stop(self, grace: float = 2.0) -> None:
        """Wait up to ``grace`` seconds for every child to exit by itself, then SIGTERM the
        rest and wait up to 2 s, then SIGKILL. Returns within about ``grace`` + 8 s."""
        _wait_all(self.alive(), grace)
        alive = self.alive()
        if alive:
            self.signal(signal.SIGTERM)
            _wait_all(alive, 2.0)
        self.kill()

    def kill(self) -> None:
        """SIGKILL every child still alive and reap them (bounded waits)."""
        alive = self.alive()
        if alive:
            self.signal(signal.SIGKILL)
            _wait_all(alive, 5.0)
        deadline = time.monotonic() + 1.0
        for t in self.pumps:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
