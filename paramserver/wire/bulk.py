"""The bulk channel: large dense payloads over plain TCP connections, beside ZeroMQ.

libzmq receives into its own message buffers, so an array that travels as ZeroMQ frames is
copied once more on arrival (and assembled from 1 MiB frames). A bulk connection carries only
raw array bytes, received straight into their destination: the weights' scratch buffer on a
server, the result array on a worker. Headers still travel over ZeroMQ, in order; a header
with a ``bulk`` field says that its payload follows on the bulk connection between the same
two nodes. Both ends consume payloads in the order of their headers (ZeroMQ and TCP are both
FIFO), so a connection needs no framing of its own.

* :class:`Listener` (server): accepts connections, binds each to the worker that presents a
  one-time ticket (given to it over ZeroMQ), hands over push payloads without ever blocking
  the server's event loop (one read ahead whole is taken at once; the rest of one still on
  its way is read by the connection's thread, which wakes the loop when it is in; one that
  misses its deadline is given up and its connection closed) and queues pull payloads,
  which the connection's own thread writes while the server's event loop goes on.
* :class:`Channel` (worker): one connection to one server.

Every connection is read ahead by a thread of its own and written by another
(:mod:`paramserver.wire.streams`): a request's payloads to all its servers, and the payloads
of several peers arriving at once, travel at the same time instead of one after another (on a
link that several flows share, one at a time leaves the others' links idle). Bytes read before
anyone asked for them wait in memory of the connection's own (at most ``READ_AHEAD``) and are
copied out once; bytes read while someone waits go straight into the destination.

With a cluster token (CURVE on every ZeroMQ socket), payloads travel as AES-GCM records keyed
per ticket from the token (:mod:`paramserver.wire.seal`), and a worker proves in its hello that
it holds the key; without the optional ``cryptography`` package, a token turns the channel off
and values travel in CURVE frames. Bytes travel in the machine's byte order (little-endian, like the ZeroMQ frames; big-endian hosts are
not supported). Errors are ``OSError``; the callers translate them into the library's errors.
"""

from __future__ import annotations

import logging
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from paramserver.errors import (
    ConfigError,
    NodeLostError,
    ProtocolError,
    PSTimeoutError,
    RemoteError,
)
from paramserver.wire import seal
from paramserver.wire.streams import (
    JOIN,
    MIN_RATE,
    READ_AHEAD,
    Reader,
    Writer,
    suppress_oserror,
)

__all__ = ["MIN_BYTES", "PRESEND_MAX", "Channel", "Listener", "can_seal", "open_channel", "presend"]

log = logging.getLogger(__name__)

# Payloads below this stay in ZeroMQ frames: the copy out of libzmq's buffer costs little there.
MIN_BYTES = 1 << 20
_MAGIC = b"PSBULK01"
_HELLO = len(_MAGIC) + 8  # magic, then the ticket as a little-endian u64
_SEALED_MAGIC = b"PSBULKS2"  # (S1: records without a length, opened once all were in)
_SEALED_HELLO = len(_SEALED_MAGIC) + 8 + seal.TAG  # and the proof of the key
_ACK = b"\x01"
# A payload up to this size may go before its header (:func:`presend`), found there by it.
PRESEND_MAX = READ_AHEAD // 2
_TICKETS = 1024  # outstanding tickets kept per server (oldest dropped)
# A server's connection leaves up to this many bytes in the socket before its reader thread
# reads them ahead (Reader's ``hold``): a push's payload below it, sent before its header, is
# read by the event loop straight into its buffer once the header came (no thread woken).
HOLD = 4 << 20
# The congestion control of bulk connections, whatever the machine's default. A step's
# transfers start and end together, several flows on a link: when one ends, BBR (a common
# default) takes many round trips to probe for the room it left, so the flows left run below
# the link's rate; CUBIC's window fills it at once. On emulated 500 Mbit hosts, 2 server x 2
# worker hosts: 0.79 -> 0.90 of the links (docs/performance.md, "Between hosts").
CONGESTION = b"cubic"


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _congestion(sock)


def _congestion(sock: socket.socket) -> None:
    """Use CONGESTION on ``sock`` (a listening socket's connections inherit it), where the
    system has it; else the machine's default stays."""
    if hasattr(socket, "TCP_CONGESTION"):  # Linux
        with suppress_oserror():  # not in this kernel, or not allowed
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, CONGESTION)


def _connect(host: str, port: int, idle: float) -> socket.socket:
    """Connect, CONGESTION set first (after, BBR's pacing stays on); paced only to another host
    (on one host, a paced 1 MiB send costs 3x the CPU: docs/performance.md)."""
    err: OSError | None = None
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(idle)
            _tune(sock)
            sock.connect(addr)
            if hasattr(socket, "TCP_CONGESTION") and sock.getsockname()[0] != addr[0]:
                with suppress_oserror():  # SO_MAX_PACING_RATE (47), any rate below ~0: paced
                    sock.setsockopt(socket.SOL_SOCKET, 47, (1 << 62).to_bytes(8, sys.byteorder))
            return sock
        except OSError as exc:
            sock.close()
            err = exc
    raise err if err is not None else OSError(f"no address for {host}:{port}")


def recv_exactly(sock: socket.socket, buf: memoryview, idle: float, what: str) -> None:
    """Fill ``buf`` from ``sock``; OSError if the peer closes, or sends nothing for ``idle``
    seconds (TimeoutError), naming ``what`` and how far it got."""
    got, n = 0, buf.nbytes
    # a total deadline too: a peer sending a byte now and then would hold the reader forever
    deadline = time.monotonic() + idle + n / MIN_RATE
    try:
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionError(
                    f"{what}: {got} of {n} bytes received, slower than the least rate of "
                    f"{MIN_RATE} bytes/s (after {idle:g}s of grace)"
                )
            sock.settimeout(min(idle, left))
            r = sock.recv_into(buf[got:], n - got)
            if not r:
                raise ConnectionError(f"{what}: connection closed after {got} of {n} bytes")
            got += r
    except TimeoutError:
        if time.monotonic() >= deadline:
            raise ConnectionError(
                f"{what}: {got} of {n} bytes received, slower than the least rate of "
                f"{MIN_RATE} bytes/s (after {idle:g}s of grace)"
            ) from None
        raise TimeoutError(
            f"{what}: {got} of {n} bytes received, then nothing for {idle:g}s"
        ) from None
    except ConnectionError:
        raise
    except OSError as exc:
        raise ConnectionError(f"{what}: {exc} after {got} of {n} bytes") from None


class Channel:
    """A worker's bulk connection to one server.

    Example:
        ch = Channel.open("10.0.0.5", port, ticket, idle=5.0, where="server[0]")
        ch.send(memoryview(grad).cast("B"), "push of 'w'")
    """

    def __init__(
        self, sock: socket.socket, where: str, idle: float, key: bytes | None = None
    ) -> None:
        self.sock = sock
        self.where = where
        self.idle = idle
        self.sealed = key is not None
        sock.setblocking(False)
        opened = None if key is None else seal.Seal(key, seal.SERVER_TO_WORKER)
        sealing = None if key is None else seal.Seal(key, seal.WORKER_TO_SERVER)
        self.reader = Reader(sock, where, opened)
        self.writer = Writer(sock, where, idle, sealing)
        self.reader.start()
        self.writer.start()

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        ticket: int,
        *,
        idle: float,
        where: str,
        secret: bytes | None = None,
    ) -> Channel:
        """Connect, present ``ticket`` and wait for the server's acknowledgement. With the
        cluster ``secret`` (a token is set), payloads travel sealed."""
        key = None if secret is None else seal.ticket_key(secret, ticket)
        sock = _connect(host, port, idle)
        try:
            if key is None:
                sock.sendall(_MAGIC + ticket.to_bytes(8, "little"))
            else:
                sock.sendall(_SEALED_MAGIC + ticket.to_bytes(8, "little") + seal.hello_tag(key))
            ack = bytearray(1)
            recv_exactly(sock, memoryview(ack), idle, f"bulk channel to {where}: acknowledgement")
            if bytes(ack) != _ACK:
                raise ConnectionError(f"bulk channel to {where}: refused")
        except BaseException:
            sock.close()
            raise
        return cls(sock, where, idle, key)

    def send(self, data: memoryview, what: str) -> None:
        """Queue all of ``data`` for sending and return: it goes out behind what was queued
        before, while the caller goes on (to send to other servers). ``data`` must not change
        until its request is answered (the server answers once it has read all of it).
        ConnectionError if an earlier payload could not be sent (the channel is broken: the
        server refuses that payload's request)."""
        self.writer.send(data, what)

    def flush(self, what: str) -> None:
        """Wait until everything sent is written (see :meth:`Writer.flush`)."""
        self.writer.flush(self.idle, what)

    def recv_into(self, buf: memoryview, what: str) -> None:
        self.reader.read_into(buf, self.idle, f"{what} from {self.where}")

    def expect(self, buf: memoryview) -> bool:
        """Have the next payload read straight into ``buf`` as it comes (see
        :meth:`Reader.expect`); whether it took. Then :meth:`settle`."""
        return self.reader.expect(buf)

    def settle(self, n: int, what: str) -> None:
        """Wait for the first ``n`` bytes of the buffer :meth:`expect` gave, and take it back
        (``n`` = 0: no payload came)."""
        self.reader.settle(n, self.idle, f"{what} from {self.where}")

    def close(self) -> None:
        self.writer.close()
        self.reader.close()
        with suppress_oserror():
            self.sock.shutdown(socket.SHUT_RDWR)
        for t in (self.writer, self.reader):
            if t.is_alive() and t is not threading.current_thread():
                t.join(JOIN)
        self.sock.close()


@dataclass
class _Conn:
    sock: socket.socket
    identity: bytes
    rank: int
    reader: Reader
    writer: Writer  # writes the replies' payloads while the event loop goes on
    closed: bool = field(default=False)


@dataclass
class _Pending:
    """A push payload still on its way: the connection's reader fills ``buf`` (sealed: opens
    the records into it as they come) while the event loop serves others."""

    conn: _Conn
    buf: memoryview
    what: str
    deadline: float  # all of it by then: ``idle`` of grace, then at least MIN_RATE


class Listener:
    """A server's bulk port: tickets, accepted connections and their pending writes.

    The server's event loop polls :meth:`fds` and passes the events to :meth:`handle`.

    Example:
        bulk = Listener("127.0.0.1", idle=5.0)
        ticket = bulk.ticket(identity, rank)          # sent to the worker over ZeroMQ
    """

    def __init__(
        self, host: str, *, idle: float, name: str = "server", secret: bytes | None = None
    ) -> None:
        """With the cluster ``secret`` (a token is set), only sealed connections are taken."""
        if secret is not None and not seal.available():
            raise ConfigError("a sealed bulk channel needs the cryptography package")
        self.idle = idle
        self.name = name
        self.secret = secret
        self._hello_bytes = _HELLO if secret is None else _SEALED_HELLO
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.bind(("" if host in ("0.0.0.0", "*") else host, 0))
            _congestion(self.sock)
            self.sock.listen(64)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]
        self._tickets: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._hello: dict[int, tuple[socket.socket, bytearray, float]] = {}  # fd -> handshake
        self._by_fd: dict[int, _Conn] = {}
        self._by_identity: dict[bytes, _Conn] = {}
        self._pending: dict[bytes, _Pending] = {}  # by the worker's identity: one at a time
        # a reader thread whose payload is in writes a byte here: the event loop polls it
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def ticket(self, identity: bytes, rank: int) -> int:
        """A one-time ticket for the worker at ZeroMQ ``identity``."""
        t = secrets.randbits(63)
        self._tickets[t] = (identity, rank)
        while len(self._tickets) > _TICKETS:
            self._tickets.popitem(last=False)
        return t

    def connected(self, identity: bytes) -> bool:
        return identity in self._by_identity

    def fds(self) -> tuple[list[int], list[int]]:
        """(fds to watch for reading, fds to watch for writing)."""
        return [self.sock.fileno(), self._wake_r.fileno(), *self._hello], []

    def handle(self, fd: int, readable: bool, writable: bool) -> None:
        if fd == self.sock.fileno():
            self._accept()
        elif fd == self._wake_r.fileno():
            with suppress_oserror():  # BlockingIOError: drained
                while self._wake_r.recv(4096):
                    pass
        elif fd in self._hello and readable:
            self._greet(fd)

    def expire(self, now: float) -> None:
        """Close handshakes that did not complete in time (a silent or foreign client)."""
        for fd, (sock, _, deadline) in list(self._hello.items()):
            if now > deadline:
                log.warning(
                    "%s: bulk connection dropped: no ticket within %gs", self.name, self.idle
                )
                del self._hello[fd]
                sock.close()

    def drop_rank(self, rank: int) -> None:
        """Close the connections of a worker that left the cluster."""
        for c in [c for c in self._by_fd.values() if c.rank == rank]:
            self._drop(c, None)

    def take(self, identity: bytes, buf: memoryview, what: str) -> bool:
        """Fill ``buf`` with the next payload of the worker at ``identity`` if all of it is
        here already (read ahead); False if not (then :meth:`begin`). On OSError the
        connection is closed (its byte stream is no longer in step with the headers)."""
        c = self._conn(identity, what)
        try:
            return c.reader.take(buf, what)
        except BaseException as exc:  # out of step with the headers now, whatever happened
            self._drop(c, str(exc))
            raise

    def begin(self, identity: bytes, buf: memoryview, what: str) -> None:
        """Have the connection's thread read the next payload of the worker at ``identity``
        into ``buf``, and return at once: :meth:`done` says when it is in (or given up)."""
        c = self._conn(identity, what)
        if identity in self._pending:
            raise ConnectionError(f"{what}: an earlier payload of this worker is still coming")
        deadline = time.monotonic() + self.idle + c.reader.wire_size(buf.nbytes) / MIN_RATE
        self._pending[identity] = _Pending(c, buf, what, deadline)
        c.reader.begin(buf, self._wake)

    def done(self, now: float) -> list[tuple[bytes, str | None]]:
        """The payloads :meth:`begin` started that are over: (identity, None) once all in
        ``buf``, or (identity, why) once the connection broke, went silent for ``idle``, or
        fell behind the least rate: their connection is closed then (out of step)."""
        over: list[tuple[bytes, str | None]] = []
        for identity, p in list(self._pending.items()):
            reader, n = p.conn.reader, p.buf.nbytes
            got, full, why = reader.progress()
            if full:  # all in (sealed: opened), even if the connection broke after it
                why = None
            elif why is not None:
                why = f"{p.what}: {why} after {got} of {n} bytes"
            elif now > p.deadline:
                why = (
                    f"{p.what}: {got} of {n} bytes received, slower than the least rate of "
                    f"{MIN_RATE} bytes/s (after {self.idle:g}s of grace)"
                )
            elif now - reader.seen > self.idle:
                why = f"{p.what}: {got} of {n} bytes received, then nothing for {self.idle:g}s"
            else:
                continue
            del self._pending[identity]
            reader.end()
            if why is not None:
                self._drop(p.conn, why)
            over.append((identity, why))
        return over

    def send(self, identity: bytes, data: memoryview, owner: object) -> bool:
        """Queue ``data`` (a view of ``owner``'s memory) for the worker at ``identity`` and
        write what fits now; False if there is no connection to it. Call :meth:`release`
        before ``owner``'s memory changes."""
        c = self._by_identity.get(identity)
        if c is None:
            return False
        try:
            c.writer.send(data, f"reply to worker[{c.rank}]", owner)
        except OSError as exc:
            self._drop(c, str(exc))
            return False
        return True

    def release(self, owner: object) -> None:
        """Copy the unsent part of every payload viewing ``owner``'s memory (which is about to
        change): what a worker receives is the memory as it was when its reply was sent."""
        for c in self._by_fd.values():
            c.writer.release(owner)

    def close(self) -> None:
        for c in list(self._by_fd.values()):
            self._drop(c, None)
        for sock, _, _ in self._hello.values():
            sock.close()
        self._hello.clear()
        self._pending.clear()
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---- internals ------------------------------------------------------------------------

    def _conn(self, identity: bytes, what: str) -> _Conn:
        c = self._by_identity.get(identity)
        if c is None:
            raise ConnectionError(f"{what}: no bulk connection from this worker")
        return c

    def _wake(self) -> None:
        """Called by a reader thread: wake the event loop (a byte already waiting does)."""
        with suppress_oserror():
            self._wake_w.send(b"\0")

    def _accept(self) -> None:
        for _ in range(16):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: keep serving
                log.warning("%s: accepting a bulk connection failed: %s", self.name, exc)
                return
            sock.setblocking(False)
            _tune(sock)
            self._hello[sock.fileno()] = (sock, bytearray(), time.monotonic() + self.idle)

    def _greet(self, fd: int) -> None:
        sock, got, _ = self._hello[fd]
        try:
            data = sock.recv(self._hello_bytes - len(got))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        got += data
        if data and len(got) < self._hello_bytes:
            return
        del self._hello[fd]
        entry, key = None, None
        magic = _MAGIC if self.secret is None else _SEALED_MAGIC
        if len(got) == self._hello_bytes and got.startswith(magic):
            ticket = int.from_bytes(got[len(magic) : len(magic) + 8], "little")
            if self.secret is not None:
                key = seal.ticket_key(self.secret, ticket)
                if not seal.verify_hello(key, bytes(got[len(magic) + 8 :])):
                    ticket = -1  # no such ticket: whoever sent it does not hold the token
            entry = self._tickets.pop(ticket, None)
        if entry is None:
            log.warning("%s: bulk connection refused: no valid ticket", self.name)
            sock.close()
            return
        identity, rank = entry
        old = self._by_identity.get(identity)
        if old is not None:
            self._drop(old, None)
        try:
            sock.send(_ACK)
        except OSError:
            sock.close()
            return
        where = f"{self.name} worker[{rank}]"
        opened = None if key is None else seal.Seal(key, seal.WORKER_TO_SERVER)
        sealing = None if key is None else seal.Seal(key, seal.SERVER_TO_WORKER)
        c = _Conn(
            sock, identity, rank, Reader(sock, where, opened, hold=HOLD),
            Writer(sock, where, self.idle, sealing),
        )  # fmt: skip
        c.reader.start()
        c.writer.start()
        self._by_fd[fd] = c
        self._by_identity[identity] = c
        log.debug("%s: bulk connection of worker[%d] open", self.name, rank)

    def _drop(self, c: _Conn, reason: str | None) -> None:
        if c.closed:
            return
        c.closed = True
        if reason is not None:
            log.warning("%s: bulk connection of worker[%d] closed: %s", self.name, c.rank, reason)
        self._by_fd.pop(c.sock.fileno(), None)
        if self._by_identity.get(c.identity) is c:
            del self._by_identity[c.identity]
        c.reader.close()
        c.writer.close()
        with c.writer.sending, suppress_oserror():
            c.sock.shutdown(socket.SHUT_RDWR)
        for t in (c.reader, c.writer):
            if t.is_alive():
                t.join(JOIN)
        c.sock.close()


def can_seal() -> bool:
    """Whether this process can seal bulk payloads (the ``cryptography`` package is there): a
    node with a cluster token uses the bulk channel only then."""
    return seal.available()


def open_channel(endpoint: Any, name: str, rank: int, idle: float) -> bool:
    """Open the bulk channel of ``endpoint`` (a :class:`~paramserver.wire.transport.Endpoint`)
    to peer ``name`` unless it is open (or was refused); whether it is open. With the endpoint's
    cluster token it is sealed (and not opened where :func:`can_seal` is false). ``idle``: how
    long a transfer may make no progress.

    Example:
        if open_channel(client.endpoint, "server[0]", client.rank, 5.0): ...
    """
    security = endpoint.security
    peer = endpoint.peers.get(name)
    if peer is None or peer.lost is not None or peer.bulk_off:
        return False
    if security is not None and not can_seal():
        return False
    if peer.bulk is not None:
        return True
    sealed = "sealed " if security is not None else ""
    what = f"opening the {sealed}bulk channel to {name} at {peer.address}"
    try:
        reply = endpoint.request(name, {"kind": "open_bulk", "rank": rank}, what=what).result(idle)
        if not isinstance(reply.get("port"), int) or not isinstance(reply.get("ticket"), int):
            raise ProtocolError("no port and ticket in the reply")
        host = peer.address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        channel = Channel.open(
            host, reply["port"], reply["ticket"], idle=idle, where=name,
            secret=None if security is None else security.server_secret,
        )  # fmt: skip
    except (NodeLostError, PSTimeoutError):
        return False  # the peer itself is in trouble; its requests will say so
    except (RemoteError, ProtocolError, OSError) as exc:
        log.info("%s failed (%s); it gets ZeroMQ frames", what, exc)
        peer.bulk_off = True
        return False
    if endpoint.peers.get(name) is not peer:  # replaced while we waited
        channel.close()
        return False
    peer.bulk = channel
    return True


def presend(endpoint: Any, parts: list[tuple[str, memoryview] | None], what: str) -> list[bool]:
    """Send each part (peer name, payload of at most PRESEND_MAX bytes) on the open bulk channel
    of ``endpoint`` to that peer, all at once, and wait until every one is written: the
    servers read them ahead, so that the headers sent next find their payloads there and no
    server's event loop waits for a link (it handles one message at a time). Whether each part
    went; the caller sends the header of one that went with ``bulk`` set to its size, and the
    others as usual. A part that failed closes its channel (no header names its bytes).

    Example:
        went = presend(ep, [("server[0]", memoryview(g[:n]).cast("B")), None], "push of 'w'")
    """
    sending: list[tuple[Any, Channel] | None] = []
    for part in parts:
        peer = endpoint.peers.get(part[0]) if part is not None else None
        channel = peer.bulk if peer is not None and peer.lost is None else None
        if part is None or peer is None or channel is None or part[1].nbytes > PRESEND_MAX:
            sending.append(None)
            continue
        try:
            channel.send(part[1], what)
        except OSError:
            peer.close_bulk()
            sending.append(None)
            continue
        sending.append((peer, channel))
    went = []
    for item in sending:
        if item is not None:
            peer, channel = item
            try:
                channel.flush(f"{what} to {channel.where}")
            except OSError as exc:
                log.warning("%s; bulk channel closed", exc)
                if peer.bulk is channel:
                    peer.close_bulk()
                item = None
        went.append(item is not None)
    return went
