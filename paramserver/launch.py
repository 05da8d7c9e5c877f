"""Start a cluster: local processes (:class:`LocalCluster`, ``paramserver run``) or one role of a
multi-host cluster (``paramserver coordinator|server``).

Every process started here is stopped when its parent stops: on success, on error and on
Ctrl-C. Children get ``PR_SET_PDEATHSIG`` (Linux) so that even a parent killed with SIGKILL
takes them along, and they exit at once if their parent is already gone when they start.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from paramserver.config import Timeouts
from paramserver.errors import ConfigError, PSError, PSTimeoutError
from paramserver.transport import Endpoint, new_context

__all__ = ["LocalCluster", "run_job", "serve_coordinator", "serve_server"]

log = logging.getLogger(__name__)


# ---- the child side ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _guard_parent(parent_pid: int | None) -> None:
    if parent_pid is None:
        return
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)


def _on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: Any) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve_coordinator(
    bind: str, num_servers: int, num_workers: int, timeouts: Timeouts,
    ready_fd: int | None = None, parent_pid: int | None = None,
) -> None:
    """Run a coordinator bound at ``host:port`` (port 0: any free port) until stopped."""
    from paramserver.coordinator import Coordinator

    _guard_parent(parent_pid)
    host, _, port = bind.rpartition(":")
    coord = Coordinator(num_servers, num_workers, host or "127.0.0.1", int(port or 0), timeouts)
    _on_signals(coord.stop)
    if ready_fd is not None:
        os.write(ready_fd, (coord.address + "\n").encode())
        os.close(ready_fd)
    coord.serve()


def serve_server(
    coordinator: str, host: str, port: int, timeouts: Timeouts, parent_pid: int | None = None,
    advertise: str | None = None,
) -> None:
    """Run a server that registers with ``coordinator`` until stopped."""
    from paramserver.server.loop import Server

    _guard_parent(parent_pid)
    server = Server(coordinator, host, port, timeouts, advertise=advertise)
    _on_signals(server.stop)
    server.serve()


# ---- the parent side -----------------------------------------------------------------------


def _timeout_flags(t: Timeouts) -> list[str]:
    return [
        "--heartbeat-interval", repr(t.heartbeat_interval),
        "--heartbeat-timeout", repr(t.heartbeat_timeout),
        "--request-timeout", repr(t.request),
        "--connect-timeout", repr(t.connect),
    ]


def _pump(stream: IO[bytes], prefix: str, out: IO[str]) -> None:
    """Copy lines from a child's pipe to ``out``, each prefixed with its role and rank."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        out.write(f"{prefix} {line}\n")
        out.flush()
    stream.close()


class _Children:
    """The processes one launcher started, and the threads that copy their output."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.pumps: list[threading.Thread] = []

    def start(self, name: str, cmd: Sequence[str], *, env: dict[str, str] | None = None,
              prefix_output: IO[str] | None = None, pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
        piped = prefix_output is not None
        proc = subprocess.Popen(
            list(cmd), env=env, pass_fds=tuple(pass_fds),
            stdout=subprocess.PIPE if piped else None,
            stderr=subprocess.STDOUT if piped else None,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.procs.append((name, proc))
        if piped:
            assert proc.stdout is not None and prefix_output is not None
            t = threading.Thread(target=_pump, args=(proc.stdout, f"[{name}]", prefix_output),
                                 daemon=True)
            t.start()
            self.pumps.append(t)
        return proc

    def stop(self, grace: float = 2.0) -> None:
        """Wait up to ``grace`` seconds for every child, then SIGTERM, then SIGKILL."""
        deadline = time.monotonic() + grace
        for _, p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        alive = [p for _, p in self.procs if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p in alive:
            try:
                p.wait(1.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5.0)
        for t in self.pumps:
            t.join(timeout=1.0)


def _read_line(fd: int, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise PSTimeoutError(f"{what}: no answer after {timeout:.3g}s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise PSError(f"{what}: the process exited before it was ready")
            data += chunk
    return data.decode().strip()


class LocalCluster:
    """A coordinator and servers as local processes on loopback.

    Stops every process it started on exit, also when the body raises.

    Example:
        with ps.LocalCluster(servers=2, workers=1) as cluster:
            client = cluster.connect()
            emb = client.sparse_table("emb", dim=8)
    """

    def __init__(
        self,
        servers: int = 2,
        workers: int = 1,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timeouts: Timeouts | None = None,
        log_level: str = "WARNING",
        start_timeout: float = 60.0,
        output: IO[str] | None = None,
    ) -> None:
        if not isinstance(servers, int) or servers < 1:
            raise ConfigError(f"servers must be a positive integer, got {servers!r}")
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {workers!r}")
        self.num_servers = servers
        self.num_workers = workers
        self.host = host
        self.port = port
        self.timeouts = timeouts or Timeouts()
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.output = output
        self.address = ""
        self._children = _Children()
        self._clients: list[Any] = []
        self._started = False

    def _role_cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "paramserver.cli", "--log-level", self.log_level, *args,
                *_timeout_flags(self.timeouts), "--parent-pid", str(os.getpid())]

    def start(self) -> LocalCluster:
        """Start the coordinator and servers and wait until every server has registered."""
        if self._started:
            return self
        self._started = True
        try:
            read_fd, write_fd = os.pipe()
            try:
                coord = self._children.start(
                    "coordinator",
                    self._role_cmd("coordinator", "--bind", f"{self.host}:{self.port}",
                                   "-s", str(self.num_servers), "-w", str(self.num_workers),
                                   "--ready-fd", str(write_fd)),
                    pass_fds=[write_fd], prefix_output=self.output)
                os.close(write_fd)
                self.address = _read_line(read_fd, self.start_timeout,
                                          f"starting the coordinator (pid {coord.pid})")
            finally:
                os.close(read_fd)
            for r in range(self.num_servers):
                self._children.start(
                    f"server {r}",
                    self._role_cmd("server", "--coordinator", self.address, "--host", self.host),
                    prefix_output=self.output)
            self._wait_servers()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_servers(self) -> None:
        ctx = new_context()
        ep = Endpoint(ctx, request_timeout=5.0)
        ep.connect("coordinator", self.address)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                for name, p in self._children.procs:
                    if p.poll() is not None:
                        raise PSError(f"{name} exited with code {p.returncode} while the cluster "
                                      "was starting (its log is above)")
                view = ep.request("coordinator", {"kind": "get_view"},
                                  what=f"view from the coordinator at {self.address}").result(5.0)["view"]
                pending = [r for r, _, state in view["servers"] if state != "alive"]
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise PSTimeoutError(
                        f"starting the local cluster: after {self.start_timeout:.3g}s the coordinator "
                        f"at {self.address} still waits for "
                        + ", ".join(f"server[{r}]" for r in pending))
                time.sleep(0.01)
        finally:
            ep.close()
            ctx.term()

    def connect(self, *, rank: int | None = None, transport: str | None = None) -> Any:
        """Join this cluster as a worker from the current process; returns a Client
        (``transport="tcp"`` keeps values off shared memory, see :func:`paramserver.connect`).

        Example:
            client = cluster.connect()
        """
        from paramserver.client import Client

        if not self._started:
            self.start()
        client = Client(self.address, rank=rank, timeouts=self.timeouts, transport=transport)
        self._clients.append(client)
        return client

    @property
    def pids(self) -> dict[str, int]:
        """Process id of each role, e.g. ``{"coordinator": 123, "server 0": 124}``."""
        return {name: p.pid for name, p in self._children.procs}

    def close(self) -> None:
        """Stop every process this cluster started (and close the clients it handed out)."""
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        if self.address:
            ctx = new_context()
            ep = Endpoint(ctx, request_timeout=1.0)
            try:
                ep.connect("coordinator", self.address)
                ep.request("coordinator", {"kind": "shutdown"}, what="shutdown").result(1.0)
            except PSError:
                pass
            finally:
                ep.close()
                ctx.term()
        self._children.stop(grace=2.0)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_job(
    script: Sequence[str],
    *,
    servers: int,
    workers: int,
    host: str = "127.0.0.1",
    consistency: str | None = None,
    timeouts: Timeouts | None = None,
    log_level: str = "WARNING",
    out: IO[str] | None = None,
) -> int:
    """``paramserver run``: a cluster plus one process per worker running ``script``.

    Returns 0 if every worker exited 0, else the first non-zero exit code; every process it
    started is stopped before it returns, also on Ctrl-C.
    """
    out = out or sys.stdout
    timeouts = timeouts or Timeouts()
    cluster = LocalCluster(servers, workers, host=host, timeouts=timeouts, log_level=log_level,
                           output=out)
    workers_ = _Children()
    interrupted = False
    code = 0
    try:
        cluster.start()
        env = dict(os.environ)
        env.update({
            "PS_COORDINATOR": cluster.address,
            "PS_NUM_WORKERS": str(workers),
            "PS_NUM_SERVERS": str(servers),
            "PS_HEARTBEAT_INTERVAL": repr(timeouts.heartbeat_interval),
            "PS_HEARTBEAT_TIMEOUT": repr(timeouts.heartbeat_timeout),
            "PS_REQUEST_TIMEOUT": repr(timeouts.request),
            "PS_CONNECT_TIMEOUT": repr(timeouts.connect),
            "PYTHONUNBUFFERED": "1",
        })
        if consistency:
            env["PS_CONSISTENCY"] = consistency
        for r in range(workers):
            workers_.start(f"worker {r}", [sys.executable, *script],
                           env={**env, "PS_RANK": str(r)}, prefix_output=out)
        pending = dict(workers_.procs)
        while pending:
            for name, p in list(pending.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del pending[name]
                if rc != 0 and code == 0:
                    code = rc if rc > 0 else 128 - rc
                    out.write(f"[paramserver] {name} failed with exit code {rc}; stopping the job\n")
                    out.flush()
                    pending.clear()
            time.sleep(0.05)
    except KeyboardInterrupt:
        interrupted = True
        code = 130
    finally:
        workers_.stop(grace=0.0 if (code or interrupted) else 5.0)
        cluster.close()
    return code
