"""Start a cluster: local processes (:class:`LocalCluster`, ``paramserver run``) or one role of a
multi-host cluster (``paramserver coordinator|server``).

Every process started here is stopped when its parent stops: on success, on error and on
Ctrl-C. Children get ``PR_SET_PDEATHSIG`` (Linux) so that even a parent killed with SIGKILL
takes them along, and they exit at once if their parent is already gone when they start.

Linux sends that signal when the *thread* that started a child exits, not the process: start a
:class:`LocalCluster` from the main thread, or from a thread that outlives the cluster.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket as pysocket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import zmq

from paramserver.config import Timeouts, from_env
from paramserver.errors import ConfigError, PSError, PSTimeoutError
from paramserver.wire.transport import Endpoint, Security, new_context

__all__ = ["LocalCluster", "run_job", "serve_coordinator", "serve_server"]

log = logging.getLogger(__name__)

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


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits (Linux only)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _guard_parent(parent_pid: int | None) -> None:
    if parent_pid is None:
        return
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)


class _Stopped(BaseException):
    """Raised by a role's signal handler to cut short a start-up that blocks or has nothing to
    clean up yet. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    swallows it."""


def _on_signals(stop: Callable[[], None], interruptible: Callable[[], bool]) -> None:
    """SIGTERM and SIGINT stop the role: by raising :class:`_Stopped` while ``interruptible()``
    (starting up), otherwise through ``stop()`` and the loop's next turn."""

    def handler(signum: int, frame: Any) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop()
        if interruptible():
            raise _Stopped(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve_coordinator(
    bind: str,
    num_servers: int,
    num_workers: int,
    timeouts: Timeouts,
    ready_fd: int | None = None,
    parent_pid: int | None = None,
    restore: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: float | None = None,
    checkpoint_keep: int | None = None,
    token: str | None = None,
    checkpoint_every_clocks: int | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    listen_fd: int | None = None,
) -> None:
    """Run a coordinator bound at ``host:port`` (port 0: any free port) until stopped; with
    ``restore``, the cluster resumes from that checkpoint; with ``checkpoint_dir``, it writes a
    checkpoint there every ``checkpoint_every`` seconds and keeps the last ``checkpoint_keep``;
    with ``metrics_port``, it serves Prometheus metrics at ``http://metrics_host:port/metrics``;
    with ``listen_fd``, it takes over that socket, already listening at ``bind`` (inherited from
    a launcher that started the servers at the same time).

    SIGTERM or SIGINT stops it cleanly: the function returns.

    Example:
        serve_coordinator("127.0.0.1:7070", num_servers=2, num_workers=4, timeouts=Timeouts())
    """
    from paramserver.coordinator import Coordinator

    _guard_parent(parent_pid)
    # Only what was asked for is passed on, so that a plain coordinator needs no checkpointing.
    extra: dict[str, Any] = {}
    if token is not None:
        extra["security"] = Security.from_token(token)
    if restore is not None:
        extra["restore"] = restore
    if checkpoint_dir is not None:
        from paramserver.config import CheckpointPolicy

        given: dict[str, Any] = {
            "every_seconds": checkpoint_every,
            "keep": checkpoint_keep,
            "every_clocks": checkpoint_every_clocks,
        }
        extra["checkpoints"] = CheckpointPolicy(
            checkpoint_dir, **{k: v for k, v in given.items() if v is not None}
        )
    if metrics_port is not None:
        extra["metrics_port"], extra["metrics_host"] = metrics_port, metrics_host
    if listen_fd is not None:
        extra["listen_fd"] = listen_fd
    host, _, port = bind.rpartition(":")
    coord: Coordinator | None = None

    def stop() -> None:
        if coord is not None:
            coord.stop()

    # Installed before the sockets exist, so that no signal finds the default handler (which
    # would end the process with -SIGTERM instead of 0); once built, its loop wakes every 100 ms.
    _on_signals(stop, lambda: coord is None)
    try:
        coord = Coordinator(
            num_servers,
            num_workers,
            host or "127.0.0.1",
            int(port or 0),
            timeouts,
            **extra,
        )
    except _Stopped:
        return
    if ready_fd is not None:
        os.write(ready_fd, (coord.address + "\n").encode())
        os.close(ready_fd)
    coord.serve()


def serve_server(
    coordinator: str,
    host: str,
    port: int,
    timeouts: Timeouts,
    parent_pid: int | None = None,
    advertise: str | None = None,
    token: str | None = None,
    rank: int | None = None,
) -> None:
    """Run a server that registers with ``coordinator`` until stopped (as server ``rank``,
    if given: a restarted server takes the dead one's place and shards); then end the process.

    SIGTERM or SIGINT stops it cleanly, also while it still waits for the coordinator to answer
    its registration. A stopped server has closed its sockets and has nothing left to do, so
    the process exits at once: the interpreter's teardown with numba loaded took 0.3-0.8 s,
    most of a cluster's shutdown.

    Example:
        serve_server("tcp://10.0.0.1:7070", "127.0.0.1", 0, Timeouts())
    """
    from paramserver.server.loop import Server, tune_allocator, warm_kernels

    _guard_parent(parent_pid)
    tune_allocator()
    threading.Thread(target=warm_kernels, name="warm-kernels", daemon=True).start()
    server: Server | None = None

    def stop() -> None:
        if server is not None:
            server.stop()

    # Registration waits up to the connect timeout for the coordinator; a signal must not.
    _on_signals(stop, lambda: server is None or server.rank < 0)
    try:
        security = Security.from_token(token) if token is not None else None
        server = Server(
            coordinator, host, port, timeouts, advertise=advertise, security=security, rank=rank
        )
        server.serve()  # closes its sockets on the way out, whatever ends it
    except _Stopped:
        log.info("server stopped before it had registered with %s", coordinator)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- the parent side -----------------------------------------------------------------------


def _timeout_flags(t: Timeouts) -> list[str]:
    return [
        "--heartbeat-interval", repr(t.heartbeat_interval),
        "--heartbeat-timeout", repr(t.heartbeat_timeout),
        "--request-timeout", repr(t.request),
        "--connect-timeout", repr(t.connect),
    ]  # fmt: skip


# One lock for every line written on behalf of children, so lines never interleave mid-line.
_output_lock = threading.Lock()


def _say(out: IO[str], line: str) -> None:
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


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))


class _Children:
    """The processes one launcher started, and the threads that copy their output."""

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
            _die_with_parent()
            if os.getppid() != parent:  # the launcher died before prctl took effect
                os._exit(1)

        proc = subprocess.Popen(
            list(cmd),
            env=env,
            pass_fds=tuple(pass_fds),
            stdout=subprocess.PIPE if piped else None,
            stderr=subprocess.STDOUT if piped else None,
            stdin=subprocess.DEVNULL,
            preexec_fn=in_child if _prctl is not None else None,
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


def _listen(host: str, port: int) -> pysocket.socket | None:
    """A TCP socket bound at ``host:port`` (0: any free port) and listening, to hand to the
    coordinator; None where libzmq cannot take one over (then the coordinator binds itself)."""
    if not hasattr(zmq, "USE_FD") or host in ("0.0.0.0", "*"):
        return None
    try:
        family = pysocket.AF_INET6 if ":" in host else pysocket.AF_INET
        sock = pysocket.socket(family, pysocket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(256)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the coordinator at {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


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

    Stops every process it started on exit, also when the body raises. ``restore`` resumes
    from a checkpoint; ``checkpoint_dir`` (with ``checkpoint_every`` seconds and
    ``checkpoint_keep``) makes the coordinator write checkpoints periodically. With
    ``restart_servers`` (the default) a server process that dies is started again with the same
    rank; it loads its shards from the newest checkpoint, if any (see docs/fault-tolerance.md).
    ``metrics_port`` makes the coordinator serve Prometheus metrics at
    ``http://127.0.0.1:metrics_port/metrics``.

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
        restore: str | os.PathLike[str] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: float | None = None,
        checkpoint_keep: int | None = None,
        token: str | None = None,
        checkpoint_every_clocks: int | None = None,
        restart_servers: bool = True,
        metrics_port: int | None = None,
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
        self.restore = None if restore is None else os.path.abspath(restore)
        if self.restore is not None:
            from paramserver.checkpoint import find_checkpoint

            find_checkpoint(self.restore)  # a missing checkpoint is an error here, not in a child
        self._checkpoint_flags: list[str] = []
        if checkpoint_dir is not None:
            self._checkpoint_flags += ["--checkpoint-dir", os.path.abspath(checkpoint_dir)]
        if checkpoint_every is not None:
            self._checkpoint_flags += ["--checkpoint-every", repr(float(checkpoint_every))]
        if checkpoint_keep is not None:
            self._checkpoint_flags += ["--checkpoint-keep", str(int(checkpoint_keep))]
        if checkpoint_every_clocks is not None:
            self._checkpoint_flags += [
                "--checkpoint-every-clocks",
                str(int(checkpoint_every_clocks)),
            ]
        # The token travels to the children in their environment, never on a command line.
        self._token = from_env().token if token is None else token
        self._security = Security.from_token(self._token) if self._token is not None else None
        self._env = {**os.environ, "PS_TOKEN": self._token} if self._token is not None else None
        if metrics_port is not None:  # Prometheus metrics of the coordinator, on loopback
            self._checkpoint_flags += ["--metrics-port", str(int(metrics_port))]
        self.metrics_port = metrics_port
        self.address = ""
        self._children = _Children()
        self._clients: list[Any] = []
        self._started = False
        self.restart_servers = restart_servers
        self._servers: dict[int, subprocess.Popen[bytes]] = {}
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None
        self.restarts: list[tuple[int, float]] = []  # (server rank, time.monotonic() of restart)

    def _role_cmd(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "paramserver.cli",
            "--log-level",
            self.log_level,
            *args,
            *_timeout_flags(self.timeouts),
            "--parent-pid",
            str(os.getpid()),
        ]

    def start(self) -> LocalCluster:
        """Start the coordinator and servers and wait until every server has registered."""
        if self._started:
            return self
        self._started = True
        try:
            # The coordinator's socket is bound and listening here, before any process starts,
            # and handed to it: the servers start at the same time as the coordinator (their
            # connections wait in the socket's backlog), instead of after it reported its port.
            listener = _listen(self.host, self.port)
            read_fd, write_fd = os.pipe()
            try:
                bind = f"{self.host}:{self.port if listener is None else listener.getsockname()[1]}"
                fds = [write_fd] if listener is None else [write_fd, listener.fileno()]
                coord = self._children.start(
                    "coordinator",
                    self._role_cmd(
                        "coordinator",
                        "--bind",
                        bind,
                        "-s",
                        str(self.num_servers),
                        "-w",
                        str(self.num_workers),
                        "--ready-fd",
                        str(write_fd),
                        *([] if listener is None else ["--listen-fd", str(listener.fileno())]),
                        *(["--restore", self.restore] if self.restore is not None else []),
                        *self._checkpoint_flags,
                    ),
                    pass_fds=fds,
                    prefix_output=self.output,
                    env=self._env,
                )
                # Only the child may hold the write end, or a coordinator that dies at start-up
                # would never show as end-of-file here.
                os.close(write_fd)
                write_fd = -1
                if listener is not None:
                    listener.close()  # the coordinator holds its own copy
                    self.address = f"tcp://{bind}"
                    for r in range(self.num_servers):
                        self._start_server(r)
                address = _read_line(
                    read_fd, self.start_timeout, f"starting the coordinator (pid {coord.pid})"
                )
                if listener is None:
                    self.address = address
                    for r in range(self.num_servers):
                        self._start_server(r)
            finally:
                os.close(read_fd)
                if write_fd >= 0:
                    os.close(write_fd)
                if listener is not None:
                    listener.close()
            self._wait_servers()
            if self.restart_servers:
                self._monitor = threading.Thread(
                    target=self._restart_dead_servers, name="server-monitor", daemon=True
                )
                self._monitor.start()
        except BaseException:
            self.close()
            raise
        return self

    def _start_server(self, rank: int) -> None:
        self._servers[rank] = self._children.start(
            f"server {rank}",
            self._role_cmd(
                "server", "--coordinator", self.address, "--host", self.host, "--rank", str(rank)
            ),
            prefix_output=self.output,
            env=self._env,
        )

    def _restart_dead_servers(self) -> None:
        """Start a server again, same rank, when its process dies. It registers as soon as the
        coordinator has declared the dead one dead, and restores its shards from the newest
        checkpoint the coordinator knows."""
        while not self._closing.wait(0.05):
            for rank, proc in list(self._servers.items()):
                if proc.poll() is None or self._closing.is_set():
                    continue
                log.warning(
                    "server[%d] (pid %d) exited with %s; starting it again",
                    rank,
                    proc.pid,
                    _how(proc.returncode),
                )
                if self.output is not None:
                    _say(
                        self.output,
                        f"[paramserver] server {rank} exited with {_how(proc.returncode)}; "
                        "restarting it",
                    )
                self._start_server(rank)
                self.restarts.append((rank, time.monotonic()))

    def _wait_servers(self) -> None:
        ctx = new_context()
        ep = Endpoint(ctx, request_timeout=5.0, security=self._security)
        ep.connect("coordinator", self.address)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                for name, p in self._children.procs:
                    if p.poll() is not None:
                        raise PSError(
                            f"{name} exited with code {p.returncode} while the cluster "
                            "was starting (its log is above)"
                        )
                view = ep.request(
                    "coordinator",
                    {"kind": "get_view"},
                    what=f"view from the coordinator at {self.address}",
                ).result(5.0)["view"]
                pending = [r for r, _, state in view["servers"] if state != "alive"]
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise PSTimeoutError(
                        f"starting the local cluster: after {self.start_timeout:.3g}s the coordinator "
                        f"at {self.address} still waits for "
                        + ", ".join(f"server[{r}]" for r in pending)
                    )
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
        client = Client(
            self.address, rank=rank, timeouts=self.timeouts, transport=transport, token=self._token
        )
        self._clients.append(client)
        return client

    @property
    def pids(self) -> dict[str, int]:
        """Process id of each role, e.g. ``{"coordinator": 123, "server 0": 124}``."""
        return {name: p.pid for name, p in self._children.procs}

    def close(self) -> None:
        """Stop every process this cluster started (and close the clients it handed out).

        Asks the coordinator to shut the cluster down, waits up to 2 s for the processes to
        exit, then SIGTERMs and finally SIGKILLs what is left. Safe to call more than once.
        """
        self._closing.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5.0)
            self._monitor = None
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        coordinator = next((p for name, p in self._children.procs if name == "coordinator"), None)
        asked = False
        if self.address and coordinator is not None and coordinator.poll() is None:
            ctx = new_context()
            ep = Endpoint(ctx, request_timeout=1.0, security=self._security)
            try:
                ep.connect("coordinator", self.address)
                ep.request("coordinator", {"kind": "shutdown"}, what="shutdown").result(1.0)
                asked = True
            except PSError as exc:  # not answering: the SIGTERM below stops it instead
                log.debug("coordinator at %s did not take the shutdown: %s", self.address, exc)
            finally:
                ep.close()
                ctx.term()
        # Without a coordinator to tell them, the servers would wait out the grace for nothing:
        # SIGTERM (which they handle cleanly) at once.
        self._children.stop(grace=2.0 if asked else 0.0)

    def kill(self) -> None:
        """SIGKILL every process this cluster started (no shutdown request, no grace)."""
        self._closing.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5.0)
            self._monitor = None
        self._children.kill()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP turned into an interrupt, so that ``run_job`` cleans up as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt(signums: Sequence[int]) -> Iterator[None]:
    """Within the block, ``signums`` raise :class:`_Interrupted` (main thread only: elsewhere
    Python cannot install handlers, and the caller's own handling applies)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Interrupted(signum)

    # A signal ignored on purpose stays ignored (``nohup paramserver run ...``: no SIGHUP).
    previous = {
        s: signal.signal(s, handler) for s in signums if signal.getsignal(s) != signal.SIG_IGN
    }
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _exit_code(rc: int) -> int:
    """A child's return code as a shell reports it: -N (killed by signal N) becomes 128 + N."""
    return rc if rc >= 0 else 128 - rc


def _how(rc: int) -> str:
    if rc >= 0:
        return f"exit code {rc}"
    try:
        return f"signal {signal.Signals(-rc).name}"
    except ValueError:
        return f"signal {-rc}"


def _watch(workers: _Children, cluster: _Children, out: IO[str]) -> int:
    """Wait for every worker; at the first failure return its exit code at once."""
    pending = dict(workers.procs)
    reported: set[str] = set()
    while pending:
        for name, p in list(pending.items()):
            rc = p.poll()
            if rc is None:
                continue
            del pending[name]
            if rc != 0:
                _say(out, f"[paramserver] {name} failed with {_how(rc)}; stopping the job")
                return _exit_code(rc)
        for name, p in cluster.procs:
            # The workers see a lost node by themselves (and may survive it); say why it left.
            if name not in reported and p.poll() is not None:
                reported.add(name)
                _say(out, f"[paramserver] {name} exited with {_how(p.returncode)}")
        time.sleep(0.05)
    return 0


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
    token: str | None = None,
    restore: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: float | None = None,
    checkpoint_every_clocks: int | None = None,
    checkpoint_keep: int | None = None,
) -> int:
    """``paramserver run``: a cluster plus one process per worker running ``script``.

    ``restore`` and the ``checkpoint_*`` settings are :class:`LocalCluster`'s: resume from a
    checkpoint, write periodic ones (a server that dies is restarted from the newest).

    With a ``token`` (default: ``PS_TOKEN`` / ``PS_TOKEN_FILE``) every socket uses CURVE and the
    workers get the token in their environment.

    Returns 0 if every worker exited 0, else the first failed worker's exit code (128 + N for
    a worker killed by signal N); 130 on Ctrl-C, 128 + N on SIGTERM or SIGHUP. Every process
    it started is stopped before it returns: the other workers at once when one fails, and
    within about a second (then SIGTERM) when interrupted.

    Example:
        code = run_job(["train.py", "--epochs", "2"], servers=2, workers=4)
        code = run_job(["-m", "paramserver.models.logreg"], servers=2, workers=2)
    """
    if not script:
        raise ConfigError("no worker program given")
    if script[0] == "-m":
        import importlib.util

        if len(script) < 2 or importlib.util.find_spec(script[1]) is None:
            raise ConfigError(f"worker module {script[1] if len(script) > 1 else ''!r} not found")
    elif not os.path.isfile(script[0]):
        raise ConfigError(f"worker program {script[0]!r} is not a file")
    out = out or sys.stdout
    timeouts = timeouts or Timeouts()
    cluster = LocalCluster(
        servers, workers, host=host, timeouts=timeouts, log_level=log_level, output=out,
        token=token, restore=restore, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, checkpoint_every_clocks=checkpoint_every_clocks,
        checkpoint_keep=checkpoint_keep,
    )  # fmt: skip
    workers_ = _Children()
    code = 0
    interrupted = False
    with _signals_interrupt([signal.SIGTERM, signal.SIGHUP]):
        try:
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
                })  # fmt: skip
                if consistency:
                    env["PS_CONSISTENCY"] = consistency
                if cluster._token is not None:
                    env["PS_TOKEN"] = cluster._token
                for r in range(workers):
                    workers_.start(
                        f"worker {r}",
                        [sys.executable, *script],
                        env={**env, "PS_RANK": str(r)},
                        prefix_output=out,
                    )
                code = _watch(workers_, cluster._children, out)
            except KeyboardInterrupt as exc:
                interrupted = True
                signum = exc.signum if isinstance(exc, _Interrupted) else signal.SIGINT
                code = 128 + signum
                _say(out, f"[paramserver] {signal.Signals(signum).name}: stopping the job")
            finally:
                # After Ctrl-C the workers may have had it too (a terminal signals the whole
                # group): a moment to finish on their own, then SIGTERM. After a failure the
                # others are likely blocked on the failed one: SIGTERM at once.
                workers_.stop(grace=1.0 if interrupted else 0.0)
                cluster.close()
        except KeyboardInterrupt:  # interrupted again while cleaning up: no more grace
            workers_.kill()
            cluster.kill()
            code = code or 130
    return code
