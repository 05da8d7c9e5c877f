"""ZeroMQ sockets, request ids and futures. Knows nothing of tables.

* :class:`Router` is the bound side (coordinator, server): receive ``(identity, message)``,
  answer to an identity.
* :class:`Endpoint` is the connecting side: one DEALER per peer, requests tagged with ids, and
  :class:`Future` objects that are completed by whoever waits. There is no background thread:
  ``Future.result()`` polls all of the endpoint's sockets, so replies from every peer are
  dispatched while any one of them is awaited, and libzmq's own I/O threads move the bytes.
* Large arrays may bypass ZeroMQ on a peer's bulk channel (:mod:`paramserver.wire.bulk`): see
  :meth:`Endpoint.open_bulk` and ``request(..., bulk=True)``.
* :class:`Heartbeat` sends heartbeats on its own thread and socket, so a long computation or a
  long kernel never looks like death.

This is the only module that imports ``zmq``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import numpy as np
import zmq
from zmq.utils import z85

from paramserver.errors import (
    ConfigError,
    NodeLostError,
    ProtocolError,
    PSTimeoutError,
    RemoteError,
)
from paramserver.wire import bulk as bulk_channel
from paramserver.wire import protocol

if TYPE_CHECKING:  # imported when a token is set: it pulls in asyncio and ssl (~40 ms)
    from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "Endpoint",
    "Future",
    "Heartbeat",
    "Router",
    "Security",
    "new_context",
    "start_authenticator",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Message = tuple[dict[str, Any], list[np.ndarray]]


def new_context() -> zmq.Context[Any]:
    """A fresh ZeroMQ context (one per process role; never the global instance)."""
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


MIN_TOKEN_LENGTH = 16
# A DEALER whose peer is unreachable (e.g. its CURVE handshake failed) has no pipe to queue a
# message on, and a plain send would then block forever: every send gives up after this long.
SEND_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class Security:
    """CURVE keys derived from the cluster token: every node that knows the token can compute
    them, and no other. Binding sockets authenticate peers by the client key (ZAP), so a peer
    without the token cannot even complete the handshake; all traffic is encrypted.

    Example:
        sec = Security.from_token(open("token").read().strip())
    """

    server_public: bytes = field(repr=False)
    server_secret: bytes = field(repr=False)
    client_public: bytes = field(repr=False)
    client_secret: bytes = field(repr=False)

    @classmethod
    def from_token(cls, token: str) -> Security:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"the cluster token must be a string of at least {MIN_TOKEN_LENGTH} characters"
            )

        def pair(purpose: bytes) -> tuple[bytes, bytes]:
            seed = hashlib.blake2b(token.encode(), digest_size=32, person=purpose).digest()
            secret = z85.encode(seed)  # any 32 bytes are an X25519 secret key
            return zmq.curve_public(secret), secret

        sp, ss = pair(b"paramserver-srv")
        cp, cs = pair(b"paramserver-cli")
        return cls(sp, ss, cp, cs)

    def serve(self, socket: zmq.Socket[Any]) -> None:
        socket.curve_secretkey = self.server_secret
        socket.curve_publickey = self.server_public
        socket.curve_server = True

    def client(self, socket: zmq.Socket[Any]) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.client_public
        socket.curve_secretkey = self.client_secret


class _AllowClusterKey:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


def start_authenticator(ctx: zmq.Context[Any], security: Security) -> ThreadAuthenticator:
    """Run the ZAP handler of ``ctx``: only peers holding the cluster's client key get in."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("paramserver.auth"))
    auth.start()
    auth.configure_curve_callback("*", _AllowClusterKey(security.client_public))
    return auth


def _frames(socket: zmq.Socket[Any]) -> list[Any]:
    return [f.buffer for f in socket.recv_multipart(copy=False)]


def _send(
    socket: zmq.Socket[Any],
    frames: Sequence[Any],
    prefix: Sequence[bytes] = (),
    track: bool = False,
) -> Any:
    return socket.send_multipart([*prefix, *frames], copy=False, track=track)


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
        parts = _frames(self.socket)
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
        return _send(self.socket, frames, prefix=(identity,), track=track)

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


class Future(Generic[T]):
    """The outcome of one request (or a group of them), completed while someone waits.

    Example:
        fut = emb.push(keys, grads)
        fut.result(timeout=10)   # waits for the acknowledgement; raises on error
    """

    def __init__(self, endpoint: Endpoint | None, what: str) -> None:
        self._endpoint = endpoint
        self.what = what
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], None]] = []

    def done(self) -> bool:
        return self._done

    def set_result(self, value: T) -> None:
        if not self._done:
            self._value, self._done = value, True
            self._run_callbacks()

    def set_exception(self, error: BaseException) -> None:
        if not self._done:
            self._error, self._done = error, True
            self._run_callbacks()

    def add_done_callback(self, fn: Callable[[Future[T]], None]) -> None:
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def _run_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._error

    def result(self, timeout: float | None = None) -> T:
        """Wait for the outcome (default: the endpoint's request timeout) and return it."""
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]

    def _wait(self, timeout: float | None) -> None:
        if self._done:
            return
        if self._endpoint is None:
            raise PSTimeoutError(f"{self.what}: nothing will complete this future")
        limit = self._endpoint.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not self._done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PSTimeoutError(f"{self.what}: no answer after {limit:.3g}s")
            self._endpoint.poll(left)


def gather(
    futures: Sequence[Future[Any]], what: str, combine: Callable[[list[Any]], T]
) -> Future[T]:
    """One future completed when all of ``futures`` are, with ``combine`` of their results.

    The first failure fails the group.
    """
    endpoint = futures[0]._endpoint if futures else None
    group: Future[T] = Future(endpoint, what)
    if not futures:
        group.set_result(combine([]))
        return group
    left = [len(futures)]

    def one_done(f: Future[Any]) -> None:
        if group.done():
            return
        if f._error is not None:
            group.set_exception(f._error)
            return
        left[0] -= 1
        if left[0] == 0:
            try:
                group.set_result(combine([g._value for g in futures]))
            except Exception as exc:  # a combine error belongs to the caller of result()
                group.set_exception(exc)

    for f in futures:
        f.add_done_callback(one_done)
    return group


@dataclass
class _Pending:
    fut: Future[Any]
    parse: Callable[[Message], Any] | None
    sink: np.ndarray | None  # where a multi-frame reply array is assembled
    region: np.ndarray | None = None  # the request's shared slot: where reply arrays may lie
    release: Callable[[], None] | None = None  # called once the answer was parsed


class _Peer:
    def __init__(
        self, ctx: zmq.Context[Any], name: str, address: str, security: Security | None
    ) -> None:
        self.name = name
        self.address = address
        self.socket: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        if security is not None:
            security.client(self.socket)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.connect(address)
        # request id -> what waits for the answer
        self.pending: dict[int, _Pending] = {}
        self.lost: str | None = None
        self.bulk: bulk_channel.Channel | None = None
        self.bulk_off = False  # refused or unreachable: this peer gets ZeroMQ frames only

    def close_bulk(self) -> None:
        if self.bulk is not None:
            self.bulk.close()
            self.bulk = None


class Endpoint:
    """The connecting side of a node: one DEALER per peer, requests and their futures.

    Example:
        ep = Endpoint(ctx, request_timeout=30)
        ep.connect("server[0]", "tcp://127.0.0.1:5555")
        fut = ep.request("server[0]", {"kind": "ping"}, what="ping server[0]")
        fut.result()
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        request_timeout: float = 60.0,
        on_message: Callable[[str, dict[str, Any], list[np.ndarray]], None] | None = None,
        security: Security | None = None,
    ) -> None:
        self.ctx = ctx
        self.security = security
        self.request_timeout = request_timeout
        self.on_message = on_message
        self.peers: dict[str, _Peer] = {}
        self._ids = itertools.count(1)
        self._poller = zmq.Poller()
        self._by_socket: dict[zmq.Socket[Any], _Peer] = {}

    def connect(self, name: str, address: str) -> None:
        old = self.peers.get(name)
        if old is not None:
            if old.address == address and old.lost is None:
                return
            self.disconnect(name, f"{name} moved from {old.address} to {address}")
        peer = _Peer(self.ctx, name, address, self.security)
        self.peers[name] = peer
        self._poller.register(peer.socket, zmq.POLLIN)
        self._by_socket[peer.socket] = peer

    def disconnect(self, name: str, reason: str) -> None:
        peer = self.peers.pop(name, None)
        if peer is None:
            return
        self._poller.unregister(peer.socket)
        del self._by_socket[peer.socket]
        self._fail_pending(peer, NodeLostError(reason))
        peer.close_bulk()
        peer.socket.close(0)

    def mark_lost(self, name: str, reason: str) -> None:
        """Fail every request in flight to ``name`` at once (it was declared dead)."""
        peer = self.peers.get(name)
        if peer is not None:
            peer.lost = reason
            self._fail_pending(peer, NodeLostError(reason))

    def open_bulk(self, name: str, rank: int, idle: float) -> bool:
        """Open the bulk channel to ``name`` unless it is open (or was refused); whether it is
        open. ``idle``: how long a transfer may make no progress. Never with a cluster token:
        the channel is not encrypted."""
        peer = self.peers.get(name)
        if peer is None or peer.lost is not None or peer.bulk_off or self.security is not None:
            return False
        if peer.bulk is not None:
            return True
        what = f"opening the bulk channel to {name} at {peer.address}"
        try:
            reply = self.request(name, {"kind": "open_bulk", "rank": rank}, what=what).result(idle)
            if not isinstance(reply.get("port"), int) or not isinstance(reply.get("ticket"), int):
                raise ProtocolError("no port and ticket in the reply")
            host = peer.address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
            channel = bulk_channel.Channel.open(
                host, reply["port"], reply["ticket"], idle=idle, where=name
            )
        except (NodeLostError, PSTimeoutError):
            return False  # the peer itself is in trouble; its requests will say so
        except (RemoteError, ProtocolError, OSError) as exc:
            log.info("%s failed (%s); it gets ZeroMQ frames", what, exc)
            peer.bulk_off = True
            return False
        if self.peers.get(name) is not peer:  # replaced while we waited
            channel.close()
            return False
        peer.bulk = channel
        return True

    def _fail_pending(self, peer: _Peer, error: BaseException) -> None:
        pending, peer.pending = peer.pending, {}
        for p in pending.values():
            p.fut.set_exception(error)

    def address_of(self, name: str) -> str:
        peer = self.peers.get(name)
        return peer.address if peer else "?"

    @overload
    def request(
        self,
        name: str,
        header: dict[str, Any],
        arrays: Sequence[np.ndarray] = (),
        *,
        what: str,
        parse: None = None,
        sink: np.ndarray | None = None,
        region: np.ndarray | None = None,
        start: int = 0,
        release: Callable[[], None] | None = None,
        bulk: bool = False,
    ) -> Future[dict[str, Any]]: ...

    @overload
    def request(
        self,
        name: str,
        header: dict[str, Any],
        arrays: Sequence[np.ndarray] = (),
        *,
        what: str,
        parse: Callable[[Message], T],
        sink: np.ndarray | None = None,
        region: np.ndarray | None = None,
        start: int = 0,
        release: Callable[[], None] | None = None,
        bulk: bool = False,
    ) -> Future[T]: ...

    def request(
        self,
        name: str,
        header: dict[str, Any],
        arrays: Sequence[np.ndarray] = (),
        *,
        what: str,
        parse: Callable[[Message], Any] | None = None,
        sink: np.ndarray | None = None,
        region: np.ndarray | None = None,
        start: int = 0,
        release: Callable[[], None] | None = None,
        bulk: bool = False,
    ) -> Future[Any]:
        """Send a request to peer ``name``; the future gets ``parse((header, arrays))``, or the
        reply header when there is no ``parse``. A reply's first array, when it comes in several
        frames or on the bulk channel, lands straight in ``sink`` (a uint8 buffer large enough)
        if given.

        With a shared slot ``region`` (the header names it), large arrays go there from offset
        ``start`` on, reply arrays may come back in it, and ``release`` runs once the answer
        was parsed (the slot is free again). With ``bulk`` and an open bulk channel to the
        peer, a single large array goes over it (the header says ``bulk: nbytes``), and a
        request without arrays says that its reply may come over it (``bulk: True``; such a
        reply's array is uint8 and its header keeps ``bulk``)."""
        peer = self.peers.get(name)
        fut: Future[Any] = Future(self, what)
        unsent: BaseException | None = None
        if peer is None:
            unsent = NodeLostError(f"{what}: not connected to {name}")
        elif peer.lost is not None:
            unsent = NodeLostError(f"{what}: {peer.lost}")
        else:
            request_id = next(self._ids)
            header = {**header, "id": request_id}
            payload = None
            if bulk and peer.bulk is not None:
                if not arrays:
                    header["bulk"] = True
                elif len(arrays) == 1 and arrays[0].nbytes >= bulk_channel.MIN_BYTES:
                    payload = np.ascontiguousarray(arrays[0]).reshape(-1).view(np.uint8)
                    header["bulk"], arrays = payload.nbytes, ()
            peer.pending[request_id] = _Pending(fut, parse, sink, region, release)
            try:
                _send(peer.socket, protocol.encode(header, arrays, region, start))
            except zmq.Again:
                peer.pending.pop(request_id, None)
                unsent = NodeLostError(f"{what}: {self._unreachable(peer)}")
            except BaseException:
                peer.pending.pop(request_id, None)
                if release is not None:
                    release()
                raise
            else:
                if payload is not None and peer.bulk is not None:
                    try:
                        peer.bulk.send(payload.data, what)
                    except OSError as exc:
                        # the server reads a short payload and refuses the request (or it is
                        # dead, and the view says so): the future is completed by that answer
                        log.warning("%s: %s; bulk channel closed", what, exc)
                        peer.close_bulk()
                return fut
        if release is not None:  # nothing went out: the slot is free again
            release()
        fut.set_exception(unsent)
        return fut

    def _unreachable(self, peer: _Peer) -> str:
        return (
            f"cannot send to {peer.name} at {peer.address}: no connection for "
            f"{SEND_TIMEOUT_MS / 1000:.0f}s (is it running, and does it use the same cluster token?)"
        )

    def send(self, name: str, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
        """Send a message that expects no answer (e.g. a reply to a request the peer made)."""
        peer = self.peers.get(name)
        if peer is None:
            raise NodeLostError(f"not connected to {name}")
        try:
            _send(peer.socket, protocol.encode(header, arrays))
        except zmq.Again:
            raise NodeLostError(self._unreachable(peer)) from None

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for messages and dispatch every one that arrived."""
        events = self._poller.poll(max(0, int(timeout * 1000)) if timeout > 0 else 0)
        for socket, _ in events:
            peer = self._by_socket.get(socket)
            if peer is None:
                continue
            while True:
                try:
                    parts = socket.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._dispatch(peer, [f.buffer for f in parts])

    def _dispatch(self, peer: _Peer, frames: list[Any]) -> None:
        try:
            if not frames:
                raise ProtocolError("empty message")
            header = protocol.decode_header(frames[0])
            # a reply's first multi-frame array goes into the request's sink, and its arrays
            # may lie in the request's shared slot
            waiting = peer.pending.get(header["id"]) if header["kind"] == "reply" else None
            alloc = None
            if waiting is not None and waiting.sink is not None:
                sink = waiting.sink

                def alloc(i: int, nbytes: int) -> np.ndarray:
                    return sink if i == 0 and sink.nbytes >= nbytes else np.empty(nbytes, np.uint8)

            region = waiting.region if waiting is not None else None
            arrays = protocol.decode_arrays(header, frames, alloc, region)
        except ProtocolError as exc:
            log.warning("dropped a malformed message from %s: %s", peer.name, exc)
            return
        if header["kind"] == "reply" and "bulk" in header:
            try:
                arrays = [self._recv_bulk(peer, header)]
            except (OSError, ProtocolError) as exc:
                peer.close_bulk()  # out of step with the headers now
                entry = peer.pending.pop(header["id"], None)
                if entry is not None:  # a closed connection: the server died, or dropped it
                    error: Exception = exc
                    if isinstance(exc, TimeoutError):
                        error = PSTimeoutError(str(exc))
                    elif isinstance(exc, OSError):
                        error = NodeLostError(str(exc))
                    entry.fut.set_exception(error)
                    if entry.release is not None:
                        entry.release()
                return
        elif header["kind"] == "error" and header["code"] == "bulk":
            peer.close_bulk()  # the server closed its end
        if header["kind"] not in ("reply", "error"):
            if self.on_message is not None:
                self.on_message(peer.name, header, arrays)
            return
        entry = peer.pending.pop(header["id"], None)
        if entry is None:
            return  # an answer to a request that already timed out
        fut, parse = entry.fut, entry.parse
        try:
            if header["kind"] == "error":
                fut.set_exception(
                    RemoteError(header["message"], node=peer.name, code=header["code"])
                )
                return
            try:
                value = parse((header, arrays)) if parse else header
            except Exception as exc:
                fut.set_exception(exc)
                return
            fut.set_result(value)
        finally:
            if entry.release is not None:
                entry.release()

    def _recv_bulk(self, peer: _Peer, header: dict[str, Any]) -> np.ndarray:
        """Read a reply's payload from the bulk channel, into its request's sink if it fits."""
        waiting = peer.pending.get(header["id"])
        what = waiting.fut.what if waiting is not None else "a late reply"
        if peer.bulk is None:
            raise ProtocolError(f"{what}: {peer.name} answered on a bulk channel that is closed")
        n = header["bulk"]
        sink = waiting.sink if waiting is not None else None
        buf = sink[:n] if sink is not None and sink.nbytes >= n else np.empty(n, np.uint8)
        peer.bulk.recv_into(buf.data, what)
        return buf

    def close(self) -> None:
        for name in list(self.peers):
            self.disconnect(name, f"{name}: endpoint closed")


class Heartbeat(threading.Thread):
    """Sends ``heartbeat`` to the coordinator every ``interval`` seconds on its own socket.

    ``epoch`` holds the newest cluster-view epoch the coordinator reported; ``expelled`` is set
    if the coordinator no longer knows this node (it was declared dead).
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        coordinator: str,
        role: str,
        rank: int,
        token: int,
        interval: float,
        status: Callable[[], dict[str, Any]] | None = None,
        security: Security | None = None,
    ) -> None:
        super().__init__(name=f"heartbeat-{role}[{rank}]", daemon=True)
        self.ctx = ctx
        self.coordinator = coordinator
        self.role, self.rank, self.token = role, rank, token
        self.interval = interval
        self.status = status
        self.security = security
        self.epoch = 0
        self.expelled: str | None = None
        self.last_answer = time.monotonic()
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 0)  # never block: a beat that cannot go out is skipped
        if self.security is not None:
            self.security.client(sock)
        sock.connect(self.coordinator)
        beat = {"kind": "heartbeat", "role": self.role, "rank": self.rank, "token": self.token}
        try:
            n = 0
            while not self._stop_event.is_set():
                n += 1
                extra = self.status() if self.status is not None else {}
                with contextlib.suppress(zmq.Again):
                    _send(sock, protocol.encode({**beat, **extra, "id": n}))
                deadline = time.monotonic() + self.interval
                while (left := deadline - time.monotonic()) > 0 and not self._stop_event.is_set():
                    # short slices, so that stop() is noticed within ~50 ms
                    if sock.poll(min(50, int(left * 1000) + 1), zmq.POLLIN):
                        self._handle(_frames(sock))
        except zmq.ZMQError as exc:  # context terminated while we were running
            if exc.errno != zmq.ETERM:
                log.warning("heartbeat thread of %s[%d] stopped: %s", self.role, self.rank, exc)
        finally:
            sock.close(0)

    def _handle(self, frames: list[Any]) -> None:
        try:
            header, _ = protocol.decode(frames)
        except ProtocolError:
            return
        self.last_answer = time.monotonic()
        if header["kind"] == "error":
            self.expelled = header["message"]
        elif header["kind"] == "reply" and isinstance(header.get("view"), dict):
            epoch = header["view"].get("epoch")
            if isinstance(epoch, int):
                self.epoch = max(self.epoch, epoch)
