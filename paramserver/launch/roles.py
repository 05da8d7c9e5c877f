"""One role of a cluster in this process: ``paramserver coordinator`` and ``paramserver server``
(also what :class:`~paramserver.launch.LocalCluster` starts in its children), and the flags a
launcher puts on a role's command line.

SIGTERM or SIGINT stops a role cleanly: a coordinator returns, a server ends its process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from paramserver.config import CheckpointPolicy, Timeouts
from paramserver.errors import ConfigError
from paramserver.launch.children import guard_parent
from paramserver.wire.transport import Security

__all__ = [
    "checkpoint_flags",
    "checkpoint_policy",
    "serve_coordinator",
    "serve_server",
    "timeout_flags",
]

log = logging.getLogger(__name__)


class _Stopped(BaseException):
    """Raised by a role's signal handler to cut short a start-up that blocks or has nothing to
    clean up yet. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    swallows it."""


def _on_signals(stop: Callable[[], None], interruptible: Callable[[], bool]) -> None:
    """SIGTERM and SIGINT (unless ignored) stop the role: by raising :class:`_Stopped` while ``interruptible()``
    (starting up), otherwise through ``stop()`` and the loop's next turn."""

    def handler(signum: int, frame: Any) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop()
        if interruptible():
            raise _Stopped(signum)

    signal.signal(signal.SIGTERM, handler)
    # A launcher starts its roles with SIGINT ignored (it answers Ctrl-C by stopping them in
    # order): keep it so, or a terminal's Ctrl-C would stop every server before its time.
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        signal.signal(signal.SIGINT, handler)


def serve_coordinator(
    bind: str,
    num_servers: int,
    num_workers: int,
    timeouts: Timeouts,
    ready_fd: int | None = None,
    parent_pid: int | None = None,
    restore: str | None = None,
    checkpoints: CheckpointPolicy | None = None,
    token: str | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    listen_fd: int | None = None,
    exit_when_done: float | None = None,
    journal: str | None = None,
    replication: int = 1,
) -> None:
    """Run a coordinator bound at ``host:port`` (port 0: any free port) until stopped; with
    ``restore``, the cluster resumes from that checkpoint; with ``checkpoints``, it writes
    periodic checkpoints by that policy; with ``metrics_port``, it serves Prometheus metrics at
    ``http://metrics_host:port/metrics``; with ``listen_fd``, it takes over that socket, already
    listening at ``bind`` (inherited from a launcher that started the servers at the same time);
    with ``exit_when_done`` (seconds a dead worker may take to come back), it ends the job and
    returns once every worker left (paramserver.coordinator.completion).

    SIGTERM or SIGINT stops it cleanly: the function returns.

    Example:
        serve_coordinator("127.0.0.1:7070", num_servers=2, num_workers=4, timeouts=Timeouts())
    """
    from paramserver.coordinator import Coordinator

    guard_parent(parent_pid)
    # Only what was asked for is passed on, so that a plain coordinator needs no checkpointing.
    extra: dict[str, Any] = {}
    if token is not None:
        extra["security"] = Security.from_token(token)
    if restore is not None:
        extra["restore"] = restore
    if checkpoints is not None:
        extra["checkpoints"] = checkpoints
    if metrics_port is not None:
        extra["metrics_port"], extra["metrics_host"] = metrics_port, metrics_host
    if listen_fd is not None:
        extra["listen_fd"] = listen_fd
    if exit_when_done is not None:
        extra["exit_when_done"] = exit_when_done
    if journal is not None:  # restarted with the same journal, it carries on the job
        extra["journal"] = journal
    if replication != 1:
        extra["replication"] = replication
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

    guard_parent(parent_pid)
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


# ---- a role's command line -----------------------------------------------------------------


def checkpoint_policy(
    checkpoints: CheckpointPolicy | None,
    directory: str | os.PathLike[str] | None,
    every_seconds: float | None,
    keep: int | None,
    every_clocks: int | None,
) -> CheckpointPolicy | None:
    """One policy from either a :class:`CheckpointPolicy` or its fields one by one (the
    ``checkpoint_*`` keywords of :class:`LocalCluster` and ``run_job``), never both."""
    loose = (directory, every_seconds, keep, every_clocks)
    if checkpoints is not None:
        if any(x is not None for x in loose):
            raise ConfigError(
                "give the checkpoint policy either as checkpoints= or as checkpoint_dir=, "
                "checkpoint_every=, checkpoint_keep=, checkpoint_every_clocks=, not both"
            )
        return checkpoints
    return CheckpointPolicy.from_settings(
        directory,
        None if every_seconds is None else float(every_seconds),
        None if keep is None else int(keep),
        None if every_clocks is None else int(every_clocks),
    )


def checkpoint_flags(policy: CheckpointPolicy | None) -> list[str]:
    """The command-line flags of ``paramserver coordinator`` that give it ``policy``.

    Example:
        checkpoint_flags(CheckpointPolicy("/ckpt", keep=2))  # ["--checkpoint-dir", "/ckpt", ...]
    """
    if policy is None:
        return []
    flags = [
        "--checkpoint-dir", policy.directory,
        "--checkpoint-every", repr(float(policy.every_seconds)),
        "--checkpoint-keep", str(policy.keep),
        "--checkpoint-timeout", repr(float(policy.timeout)),
    ]  # fmt: skip
    if policy.every_clocks is not None:
        flags += ["--checkpoint-every-clocks", str(policy.every_clocks)]
    return flags


def timeout_flags(t: Timeouts) -> list[str]:
    """The command-line flags that give a role ``t``."""
    return [
        "--heartbeat-interval", repr(t.heartbeat_interval),
        "--heartbeat-timeout", repr(t.heartbeat_timeout),
        "--request-timeout", repr(t.request),
        "--connect-timeout", repr(t.connect),
    ]  # fmt: skip
