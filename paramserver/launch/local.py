"""A coordinator and servers as local processes on loopback (:class:`LocalCluster`).

The children are ``python -m paramserver.cli coordinator|server`` (see ``roles.py``), started
and stopped by :class:`~paramserver.launch.children.Children`; a server process that dies is
started again with its rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from typing import IO, Any

from paramserver.config import (
    CheckpointPolicy,
    Limits,
    Timeouts,
    cluster_to_env,
    from_env,
    limits_to_env,
)
from paramserver.errors import ConfigError, PSError, PSTimeoutError
from paramserver.launch.children import Children, describe_exit, say
from paramserver.launch.roles import checkpoint_flags, checkpoint_policy, timeout_flags
from paramserver.partition import check_replication
from paramserver.wire.sockets import listen_for_handover
from paramserver.wire.transport import Endpoint, Future, Security, new_context

__all__ = ["LocalCluster"]

log = logging.getLogger(__name__)


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
    from a checkpoint; ``checkpoints`` (a :class:`~paramserver.config.CheckpointPolicy`), or
    ``checkpoint_dir`` with ``checkpoint_every`` seconds (or ``checkpoint_every_clocks``
    clocks) and ``checkpoint_keep``, makes the coordinator write checkpoints periodically. With
    ``restart_servers`` (the default) a server process that dies is started again with the same
    rank; it loads its shards from the newest checkpoint, if any (see docs/fault-tolerance.md).
    With ``restart_coordinator`` (the default) the coordinator journals what it knows to a file
    and a coordinator process that dies is started again on the same address with that
    journal: servers and workers carry on (see docs/fault-tolerance.md).
    ``metrics_port`` makes the coordinator serve Prometheus metrics at
    ``http://127.0.0.1:metrics_port/metrics``. With ``replication`` k (default 1, at most
    ``servers``) every key range and dense table lives on k servers and a push is acknowledged
    once every live copy holds it: a server's death loses nothing, and reads move to the next
    copy at once; a restarted rank then holds nothing ("rebuilding") and serves no one.

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
        checkpoints: CheckpointPolicy | None = None,
        restart_coordinator: bool = True,
        limits: Limits | None = None,
        replication: int = 1,
    ) -> None:
        if not isinstance(servers, int) or servers < 1:
            raise ConfigError(f"servers must be a positive integer, got {servers!r}")
        # refused here, before any process starts (the coordinator checks it again)
        self.replication = check_replication(replication, servers)
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
        policy = checkpoint_policy(
            checkpoints, checkpoint_dir, checkpoint_every, checkpoint_keep, checkpoint_every_clocks
        )
        if policy is not None:  # the child gets an absolute path, as with --restore
            policy = replace(policy, directory=os.path.abspath(policy.directory))
        self.checkpoints = policy
        # The token travels to the children in their environment, never on a command line.
        self._token = from_env().token if token is None else token
        self._security = Security.from_token(self._token) if self._token is not None else None
        self._env = {**os.environ, "PS_TOKEN": self._token} if self._token is not None else None
        if limits is not None:  # the servers and the coordinator read them as PS_LIMIT_*
            self._env = {**(self._env or os.environ), **limits_to_env(limits)}
        self._coordinator_flags = checkpoint_flags(policy)
        if replication != 1:
            self._coordinator_flags += ["--replication", str(replication)]
        if metrics_port is not None:  # Prometheus metrics of the coordinator, on loopback
            self._coordinator_flags += ["--metrics-port", str(int(metrics_port))]
        self.metrics_port = metrics_port
        self.address = ""
        # the processes this cluster started: the coordinator, the servers
        self.children = Children()
        self._clients: list[Any] = []
        self._started = False
        self.restart_servers = restart_servers
        self._servers: dict[int, subprocess.Popen[bytes]] = {}
        # servers being drained: one that stops (exit 0) is gone; one that crashes is started
        # again, and the coordinator does its drain again once it is back
        self._draining: dict[int, subprocess.Popen[bytes]] = {}
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None
        self.restarts: list[tuple[int, float]] = []  # (server rank, time.monotonic() of restart)
        self.restart_coordinator = restart_coordinator
        self.coordinator_restarts: list[float] = []  # time.monotonic() of each restart
        self._journal_dir = (
            tempfile.mkdtemp(prefix="ps-coordinator-") if restart_coordinator else ""
        )
        self._coordinator_cmd: list[str] = []
        self._listener: Any = None  # the coordinator's listening socket, kept for a restart

    def _role_cmd(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "paramserver.cli",
            "--log-level",
            self.log_level,
            *args,
            *timeout_flags(self.timeouts),
            "--parent-pid",
            str(os.getpid()),
        ]

    def start(self) -> LocalCluster:
        """Start the coordinator and servers and wait until every server has registered."""
        if self._started:
            return self
        self._started = True
        # No worker kernels loaded ahead here, nor in connect() (client/warm.py hold_warming):
        # on two cores, a thread loading numba beside the servers' start and first answers
        # delayed them by more than it saved.
        try:
            # The coordinator's socket is bound and listening here, before any process starts,
            # and handed to it: the servers start at the same time as the coordinator (their
            # connections wait in the socket's backlog), instead of after it reported its port.
            listener = listen_for_handover(self.host, self.port)
            read_fd, write_fd = os.pipe()
            try:
                bind = f"{self.host}:{self.port if listener is None else listener.getsockname()[1]}"
                fds = [write_fd] if listener is None else [write_fd, listener.fileno()]
                self._coordinator_cmd = self._role_cmd(
                    "coordinator",
                    "--bind",
                    bind,
                    "-s",
                    str(self.num_servers),
                    "-w",
                    str(self.num_workers),
                    *([] if listener is None else ["--listen-fd", str(listener.fileno())]),
                    *(["--restore", self.restore] if self.restore is not None else []),
                    *self._coordinator_flags,
                    *(["--journal", os.path.join(self._journal_dir, "journal")]
                      if self.restart_coordinator else []),
                )  # fmt: skip
                coord = self.children.start(
                    "coordinator",
                    [*self._coordinator_cmd, "--ready-fd", str(write_fd)],
                    pass_fds=fds,
                    prefix_output=self.output,
                    env=self._env,
                )
                # Only the child may hold the write end, or a coordinator that dies at start-up
                # would never show as end-of-file here.
                os.close(write_fd)
                write_fd = -1
                if listener is not None:
                    if self.restart_coordinator:  # kept for a restarted coordinator
                        self._listener, listener = listener, None
                    else:
                        listener.close()  # the coordinator holds its own copy
                    self.address = f"tcp://{bind}"
                    for r in range(self.num_servers):
                        self._start_server(r)
                address = _read_line(
                    read_fd, self.start_timeout, f"starting the coordinator (pid {coord.pid})"
                )
                if not self.address:
                    self.address = address
                    # a restarted coordinator binds the port this one got
                    at = self._coordinator_cmd.index("--bind") + 1
                    self._coordinator_cmd[at] = address.removeprefix("tcp://")
                    for r in range(self.num_servers):
                        self._start_server(r)
            finally:
                os.close(read_fd)
                if write_fd >= 0:
                    os.close(write_fd)
                if listener is not None:
                    listener.close()
            self._wait_servers()
            if self.restart_servers or self.restart_coordinator:
                self._monitor = threading.Thread(
                    target=self._restart_dead_servers, name="server-monitor", daemon=True
                )
                self._monitor.start()
        except BaseException:
            self.close()
            raise
        return self

    def _start_server(self, rank: int) -> None:
        self._servers[rank] = self.children.start(
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
        checkpoint the coordinator knows. A server the coordinator declared dead whose process
        still exists (paused, hung) is killed first, so that it can never come back."""
        ctx = new_context()
        ep = Endpoint(ctx, request_timeout=5.0, security=self._security)
        ep.connect("coordinator", self.address)
        asked: Future[dict[str, Any]] | None = None  # the status request in flight, if any
        every = min(0.5, self.timeouts.heartbeat_interval)
        due = time.monotonic()
        try:
            while not self._closing.wait(0.05):
                self._restart_dead_coordinator()
                if not self.restart_servers:
                    continue
                if time.monotonic() >= due:
                    due = time.monotonic() + every
                    asked = self._kill_hung_servers(ep, asked)
                for rank, proc in list(self._servers.items()):
                    if proc.poll() is None or self._closing.is_set():
                        continue
                    log.warning(
                        "server[%d] (pid %d) exited with %s; starting it again",
                        rank,
                        proc.pid,
                        describe_exit(proc.returncode),
                    )
                    if self.output is not None:
                        say(
                            self.output,
                            f"[paramserver] server {rank} exited with "
                            f"{describe_exit(proc.returncode)}; restarting it",
                        )
                    self._start_server(rank)
                    self.restarts.append((rank, time.monotonic()))
                self._restart_crashed_drains()
        finally:
            ep.close()
            ctx.term()

    def _restart_crashed_drains(self) -> None:
        """A server being drained that died (not stopped once drained, exit 0) is started
        again: its keys come back as for any server's death, and its drain is done again."""
        for rank, proc in list(self._draining.items()):
            if proc.poll() is None or self._closing.is_set():
                continue
            del self._draining[rank]
            if proc.returncode == 0:
                continue
            log.warning("server[%d] (pid %d), being drained, exited with %s; starting it again",
                        rank, proc.pid, describe_exit(proc.returncode))  # fmt: skip
            self._start_server(rank)
            self._draining[rank] = self._servers.pop(rank)
            self.restarts.append((rank, time.monotonic()))

    def _restart_dead_coordinator(self) -> None:
        """Start the coordinator again, on its address and with its journal, if it died (not
        if it exited cleanly: a ``shutdown`` request ends the cluster)."""
        if not self.restart_coordinator or self._closing.is_set():
            return
        coord = self._coordinator()
        if coord is None or coord.poll() in (None, 0):  # running, or shut down on request
            return
        log.warning(
            "the coordinator (pid %d) exited with %s; starting it again at %s",
            coord.pid,
            describe_exit(coord.returncode),
            self.address,
        )
        if self.output is not None:
            say(
                self.output,
                f"[paramserver] coordinator exited with {describe_exit(coord.returncode)}; "
                "restarting it",
            )
        fds = [] if self._listener is None else [self._listener.fileno()]
        self.children.start(
            "coordinator",
            self._coordinator_cmd,
            pass_fds=fds,
            prefix_output=self.output,
            env=self._env,
        )
        self.coordinator_restarts.append(time.monotonic())

    def _coordinator(self) -> subprocess.Popen[bytes] | None:
        """The newest coordinator process (earlier ones died and were replaced)."""
        procs = [p for name, p in self.children.procs if name == "coordinator"]
        return procs[-1] if procs else None

    def _kill_hung_servers(
        self, ep: Endpoint, asked: Future[dict[str, Any]] | None
    ) -> Future[dict[str, Any]]:
        """SIGKILL the server processes the coordinator declared dead while they still exist
        (the pid it registered with, so never a replacement). Returns the status request in
        flight (asked again once answered)."""
        ep.poll(0)
        if asked is not None and not asked.done():
            return asked
        if asked is not None and asked.exception(0) is None:
            for node in asked.result(0)["status"]["nodes"]:
                proc = self._servers.get(node["rank"])
                if (
                    node["role"] == "server"
                    and node["state"] == "dead"
                    and proc is not None
                    and proc.pid == node["pid"]
                    and proc.poll() is None
                ):
                    log.warning(
                        "server[%d] (pid %d) was declared dead but its process is still there "
                        "(paused or hung): killing it before it is replaced",
                        node["rank"],
                        proc.pid,
                    )
                    if self.output is not None:
                        say(
                            self.output,
                            f"[paramserver] server {node['rank']} (pid {proc.pid}) was declared "
                            "dead but still exists; killing it",
                        )
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
        return ep.request("coordinator", {"kind": "status"}, what="status of the cluster")

    def _wait_servers(self) -> None:
        ctx = new_context()
        ep = Endpoint(ctx, request_timeout=5.0, security=self._security)
        ep.connect("coordinator", self.address)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                for name, p in self.children.procs:
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

    def _ask(self, header: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """One request to the coordinator on a connection of its own (RemoteError: refused)."""
        ctx = new_context()
        ep = Endpoint(ctx, request_timeout=timeout, security=self._security)
        try:
            ep.connect("coordinator", self.address)
            return ep.request("coordinator", header, what=f"{header['kind']} to the "
                              f"coordinator at {self.address}").result(timeout)  # fmt: skip
        finally:
            ep.close()
            ctx.term()

    def add_server(self, *, timeout: float | None = None) -> int:
        """Start one more server; it joins the running job's hash ring and its share of the
        sparse keys moves to it while training goes on (the workers switch at their next
        ``clock()``; see docs/fault-tolerance.md). Returns its rank once it registered. Call
        it from a thread that lives as long as the cluster (the main thread): a child gets
        SIGTERM when the thread that started it ends.

        Example:
            rank = cluster.add_server()      # e.g. 2 in a cluster started with servers=2
        """
        limit = self.start_timeout if timeout is None else timeout
        proc = self.children.start(
            f"server (joining, {len(self._servers)})",
            self._role_cmd("server", "--coordinator", self.address, "--host", self.host),
            prefix_output=self.output,
            env=self._env,
        )
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PSError(f"the joining server exited with code {proc.returncode}")
            nodes = self._ask({"kind": "status"})["status"]["nodes"]
            mine = [n for n in nodes if n["role"] == "server" and n.get("pid") == proc.pid]
            if mine and mine[0]["state"] == "alive":
                self._servers[int(mine[0]["rank"])] = proc
                return int(mine[0]["rank"])
            time.sleep(0.05)
        raise PSTimeoutError(f"a joining server (pid {proc.pid}) did not register within {limit}s")

    def remove_server(self, rank: int, *, wait: bool = False, timeout: float = 60.0) -> None:
        """Drain server ``rank``: its keys move to the others while training goes on (the
        workers switch at their next ``clock()``), then it stops. RemoteError if the
        coordinator refuses (not on the ring, the last server, with replication fewer servers
        than copies or a dense table; its dense ranges move: a cut table is cut anew over the
        servers left). If it dies before it left,
        it is started again and drained again (the coordinator abandons the move and queues
        it). With
        ``wait``, return once it left (do not wait from the only thread that trains: the move
        needs its ``clock()``).

        Example:
            cluster.remove_server(1)
        """
        from paramserver.launch.drain import drain_server

        proc = self._servers.pop(int(rank), None)  # its exit once drained is no crash
        try:
            drain_server(self.address, int(rank), token=self._token, timeout=timeout, wait=wait)
        except BaseException:
            if proc is not None and proc.poll() is None:
                self._servers[int(rank)] = proc
            raise
        if proc is not None:
            self._draining[int(rank)] = proc

    def connect(self, *, rank: int | None = None, transport: str | None = None) -> Any:
        """Join this cluster as a worker from the current process; returns a Client
        (``transport="tcp"`` keeps values off shared memory, see :func:`paramserver.connect`).

        Example:
            client = cluster.connect()
        """
        from paramserver.client import Client
        from paramserver.client.warm import hold_warming

        if not self._started:
            self.start()
        hold_warming()  # the servers here answer its first requests on the same cores
        client = Client(
            self.address, rank=rank, timeouts=self.timeouts, transport=transport, token=self._token
        )
        self._clients.append(client)
        return client

    def worker_env(self) -> dict[str, str]:
        """The ``PS_*`` variables a worker process of this cluster needs: the coordinator's
        address, the cluster's size, the timeouts, and the token if the cluster has one.

        Example:
            subprocess.run([sys.executable, "train.py"], env={**os.environ, **cluster.worker_env()})
        """
        return cluster_to_env(
            self.address, self.num_workers, self.num_servers, self.timeouts, self._token
        )

    @property
    def pids(self) -> dict[str, int]:
        """Process id of each role, e.g. ``{"coordinator": 123, "server 0": 124}``."""
        return {name: p.pid for name, p in self.children.procs}

    def stop_restarting(self) -> None:
        """Restart no more servers: the cluster is being stopped (a server that exits now is
        not a crash). ``close()`` does it too; a launcher calls it first when interrupted.

        Example:
            cluster.stop_restarting(); workers.stop(); cluster.close()
        """
        self._closing.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5.0)
            self._monitor = None

    def close(self) -> None:
        """Stop every process this cluster started (and close the clients it handed out).

        Asks the coordinator to shut the cluster down, waits up to 2 s for the processes to
        exit, then SIGTERMs and finally SIGKILLs what is left. Safe to call more than once.
        """
        self.stop_restarting()
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        coordinator = self._coordinator()
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
        self.children.stop(grace=2.0 if asked else 0.0)
        self._drop_journal()

    def _drop_journal(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._journal_dir:
            shutil.rmtree(self._journal_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL every process this cluster started (no shutdown request, no grace)."""
        self.stop_restarting()
        self.children.kill()
        self._drop_journal()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
