"""The bound side of a node (coordinator, server): one ROUTER socket that receives requests from
any peer and answers them by identity, and the link events libzmq saw on it (ZMTP liveness:
which connection a message came on, which connections closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from paramserver.wire import protocol
from paramserver.wire.security import Security, start_authenticator
from paramserver.wire.sockets import recv_frames, send_frames

__all__ = ["Router"]


class Router:
    """A bound ROUTER socket: receive requests from any peer and answer them.

    With ``security`` it serves CURVE and runs the context's ZAP handler, which admits only
    peers holding the cluster's client key; :meth:`close` stops both.

    With ``listen_fd``, it takes over a TCP socket another process already bound and put in
    listening state at ``host:port``: peers may connect before this process even started.

    With ``liveness=(interval, timeout)`` (seconds), libzmq itself pings every connection every
    ``interval`` and drops one that stays silent for ``timeout`` (ZMTP heartbeats). The peer's
    libzmq I/O thread answers those pings, so a peer whose Python code holds the GIL for
    minutes still counts as connected, while a stopped process or a cut-off host does not.
    :attr:`last_fd` is then the connection the last message came on, and :meth:`dropped`
    lists the connections closed since it was last called.

    Example:
        router = Router(ctx, "127.0.0.1")      # binds a random port
        ident, frames = router.recv_raw()
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        host: str = "127.0.0.1",
        port: int = 0,
        security: Security | None = None,
        listen_fd: int | None = None,
        liveness: tuple[float, float] | None = None,
    ) -> None:
        self.auth = start_authenticator(ctx, security) if security is not None else None
        self.socket: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        self.last_fd = -1
        self._monitor: zmq.Socket[Any] | None = None
        if liveness is not None:
            interval, timeout = (max(1, int(x * 1000)) for x in liveness)
            self.socket.setsockopt(zmq.HEARTBEAT_IVL, interval)
            self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
            self.socket.setsockopt(zmq.HEARTBEAT_TTL, timeout)
            self._monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        if security is not None:
            security.serve(self.socket)
        if listen_fd is not None:  # a socket already listening at host:port (ZMQ_USE_FD)
            self.socket.setsockopt(zmq.USE_FD, listen_fd)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        bind_host = "*" if host in ("0.0.0.0", "*") else host
        try:
            if port:
                self.socket.bind(f"tcp://{bind_host}:{port}")
            else:
                port = self.socket.bind_to_random_port(f"tcp://{bind_host}")
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"cannot bind tcp://{host}:{port}: {exc}") from None
        self.port = port
        self.address = f"tcp://{host}:{port}"

    def poller(self) -> zmq.Poller:
        """A poller over this socket (and its connection monitor, with ``liveness``)."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        return poller

    def recv_raw(self) -> tuple[bytes, list[Any]]:
        """One message as (identity, frames); frames are not yet validated."""
        parts = recv_frames(self.socket)
        return bytes(parts[0]), parts[1:]

    def recv_raw_nowait(self) -> tuple[bytes, list[Any]]:
        """Like :meth:`recv_raw` but raises BlockingIOError when nothing is waiting."""
        try:
            got = self.socket.recv_multipart(copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise BlockingIOError from None
        if self._monitor is not None and len(got) > 1:
            self.last_fd = int(got[1].get(zmq.SRCFD))
        parts = [f.buffer for f in got]
        return bytes(parts[0]), parts[1:]

    @property
    def monitor(self) -> zmq.Socket[Any] | None:
        """The socket that becomes readable when a connection closed (with ``liveness``)."""
        return self._monitor

    def dropped(self) -> list[int]:
        """The connections (file descriptors, as :attr:`last_fd` names them) that libzmq
        closed since the last call: the peer went away, or missed its pings."""
        if self._monitor is None:
            return []
        from zmq.utils.monitor import parse_monitor_message

        fds: list[int] = []
        while True:
            try:
                msg = self._monitor.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return fds
            event = parse_monitor_message(msg)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                fds.append(int(event["value"]))

    def send(
        self,
        identity: bytes,
        header: dict[str, Any],
        arrays: Sequence[np.ndarray] = (),
        track: bool = False,
        region: np.ndarray | None = None,
        start: int = 0,
    ) -> Any:
        """Send a message (arrays without a copy). With ``track``, return a tracker whose
        ``done`` says when libzmq no longer reads the arrays (so a buffer may be reused). With
        a shared slot ``region``, large arrays lie there from offset ``start`` on."""
        frames = protocol.encode(header, arrays, region, start)
        return send_frames(self.socket, frames, prefix=(identity,), track=track)

    def reply(
        self,
        identity: bytes,
        request_id: int,
        arrays: Sequence[np.ndarray] = (),
        track: bool = False,
        region: np.ndarray | None = None,
        start: int = 0,
        **fields: Any,
    ) -> Any:
        header = {"kind": "reply", "id": request_id, **fields}
        return self.send(identity, header, arrays, track, region, start)

    def error(self, identity: bytes, request_id: int, code: str, message: str) -> None:
        self.send(identity, protocol.error_header(request_id, code, message))

    def close(self) -> None:
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        self.socket.close(0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
