"""The connecting side of a node, and the one place the rest of the package imports the
transport from. Knows nothing of tables.

* :class:`Endpoint` (here): one DEALER per peer, requests tagged with ids, and
  :class:`Future` objects that are completed by whoever waits. There is no background thread:
  ``Future.result()`` polls all of the endpoint's sockets, so replies from every peer are
  dispatched while any one of them is awaited, and libzmq's own I/O threads move the bytes.
* Large arrays may bypass ZeroMQ on a peer's bulk channel (:mod:`paramserver.wire.bulk`): see
  :func:`paramserver.wire.bulk.open_channel` and ``request(..., bulk=True)``.
* :class:`Router` (``router.py``) is the bound side (coordinator, server): receive
  ``(identity, message)``, answer to an identity; with ZMTP liveness it reports link events.
* :class:`Future` and :func:`gather` (``future.py``); :class:`Security` and the ZAP handler
  (``security.py``); contexts and frames (``sockets.py``); :class:`Pulse`, beats
  on their own thread and socket (``heartbeat.py``).
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar, Unpack, overload

import numpy as np
import zmq

from paramserver.errors import NodeLostError, ProtocolError, PSTimeoutError, RemoteError
from paramserver.wire import bulk as bulk_channel
from paramserver.wire import protocol
from paramserver.wire.future import Future, gather
from paramserver.wire.heartbeat import Pulse
from paramserver.wire.router import Router
from paramserver.wire.security import MIN_TOKEN_LENGTH, Security, start_authenticator
from paramserver.wire.sockets import SEND_TIMEOUT_MS, Message, new_context, send_frames

__all__ = [
    "MIN_TOKEN_LENGTH",
    "SEND_TIMEOUT_MS",
    "Endpoint",
    "Future",
    "Message",
    "Pulse",
    "Router",
    "Security",
    "gather",
    "new_context",
    "start_authenticator",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Pending:
    fut: Future[Any]
    parse: Callable[[Message], Any] | None
    sink: np.ndarray | None  # where a multi-frame reply array is assembled
    region: np.ndarray | None = None  # the request's shared slot: where reply arrays may lie
    release: Callable[[], None] | None = None  # called once the answer was parsed


class SendOptions(TypedDict, total=False):
    """How :meth:`Endpoint.request` sends and receives beyond frames (see its docstring)."""

    sink: np.ndarray | None
    region: np.ndarray | None
    start: int
    release: Callable[[], None] | None
    bulk: bool


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
        if name == "coordinator":  # the same identity after a reconnect, so that a restarted
            # coordinator reaches this member at the identity its journal holds
            self.socket.setsockopt(zmq.ROUTING_ID, b"m" + secrets.token_bytes(15))
        self.socket.connect(address)
        # request id -> what waits for the answer
        self.pending: dict[int, _Pending] = {}
        self.lost: str | None = None
        self.bulk: bulk_channel.Channel | None = None
        self.bulk_off = False  # refused or unreachable: this peer gets ZeroMQ frames only
        # ids of requests whose answer may carry a bulk payload, until an answer comes (one
        # given up stays: its payload may still come), and the one whose sink the channel
        # fills as its payload arrives (Channel.expect), if any
        self.bulk_asked: set[int] = set()
        self.expecting: tuple[int, np.ndarray] | None = None  # (request id, its sink)

    def close_bulk(self) -> None:
        self.bulk_asked.clear()
        self.expecting = None
        if self.bulk is not None:
            self.bulk.close()
            self.bulk = None

    def settle(self, request_id: int, n: int, what: str) -> bool:
        """Settle the payload of ``n`` bytes (0: none) expected for ``request_id``, if it is the
        one expected; whether it was (then its first ``n`` bytes are in the request's sink).
        OSError as :meth:`Channel.settle` says."""
        self.bulk_asked.discard(request_id)
        if self.expecting is None or self.expecting[0] != request_id or self.bulk is None:
            return False
        self.expecting = None
        self.bulk.settle(n, what)
        return True


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
        **options: Unpack[SendOptions],
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
        **options: Unpack[SendOptions],
    ) -> Future[T]: ...

    def request(
        self,
        name: str,
        header: dict[str, Any],
        arrays: Sequence[np.ndarray] = (),
        *,
        what: str,
        parse: Callable[[Message], Any] | None = None,
        **options: Unpack[SendOptions],
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
        sink, region = options.get("sink"), options.get("region")
        start, release = options.get("start", 0), options.get("release")
        bulk = options.get("bulk", False)
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
                    # the payload is sent ahead of its header: into the sink as it comes,
                    # unless an earlier one is due first
                    if not peer.bulk_asked and sink is not None and peer.bulk.expect(sink.data):
                        peer.expecting = (request_id, sink)
                    peer.bulk_asked.add(request_id)
                elif len(arrays) == 1 and arrays[0].nbytes >= bulk_channel.MIN_BYTES:
                    payload = np.ascontiguousarray(arrays[0]).reshape(-1).view(np.uint8)
                    header["bulk"], arrays = payload.nbytes, ()
            peer.pending[request_id] = _Pending(fut, parse, sink, region, release)
            try:
                send_frames(peer.socket, protocol.encode(header, arrays, region, start))
            except zmq.Again:
                peer.pending.pop(request_id, None)
                self._unexpect(peer, request_id, what)
                unsent = NodeLostError(f"{what}: {self._unreachable(peer)}")
            except BaseException:
                peer.pending.pop(request_id, None)
                self._unexpect(peer, request_id, what)
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

    def _unexpect(self, peer: _Peer, request_id: int, what: str) -> None:
        """No payload comes for ``request_id`` (not sent, or answered without one)."""
        try:
            peer.settle(request_id, 0, what)
        except OSError:
            peer.close_bulk()

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
            send_frames(peer.socket, protocol.encode(header, arrays))
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
        elif header["kind"] in ("reply", "error"):
            self._unexpect(peer, header["id"], "an answer without a payload")
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
        if peer.expecting is not None and peer.expecting[0] == header["id"]:
            sink = peer.expecting[1]  # it went there as it came
            got = min(n, sink.nbytes)
            peer.settle(header["id"], got, what)
            if got == n:
                return sink[:n]
            buf = np.empty(n, np.uint8)  # longer than the sink: its head is there
            buf[:got] = sink[:got]
            peer.bulk.recv_into(buf.data[got:], what)
            return buf
        peer.bulk_asked.discard(header["id"])
        buf = sink[:n] if sink is not None and sink.nbytes >= n else np.empty(n, np.uint8)
        peer.bulk.recv_into(buf.data, what)
        return buf

    def close(self) -> None:
        for name in list(self.peers):
            self.disconnect(name, f"{name}: endpoint closed")
