"""The bulk channel: large dense payloads over plain TCP connections, beside ZeroMQ.

libzmq receives into its own message buffers, so an array that travels as ZeroMQ frames is
copied once more on arrival (and assembled from 1 MiB frames). A bulk connection carries only
raw array bytes, received straight into their destination: the weights' scratch buffer on a
server, the result array on a worker. Headers still travel over ZeroMQ, in order; a header
with a ``bulk`` field says that its payload follows on the bulk connection between the same
two nodes. Both ends consume payloads in the order of their headers (ZeroMQ and TCP are both
FIFO), so a connection needs no framing of its own.

* :class:`Listener` (server): accepts connections, binds each to the worker that presents a
  one-time ticket (given to it over ZeroMQ), reads push payloads (blocking, with a timeout:
  the worker is sending them right behind their header) and queues pull payloads, which the
  connection's own thread writes while the server's event loop goes on.
* :class:`Channel` (worker): one connection to one server.

Every connection is read ahead by a thread of its own (:class:`_Reader`) and a worker's writes
go out from one (:class:`_Writer`): a request's payloads to all its servers, and the payloads
of several peers arriving at once, travel at the same time instead of one after another (on a
link that several flows share, one at a time leaves the others' links idle). Bytes read before
anyone asked for them wait in memory of the connection's own (at most ``READ_AHEAD``) and are
copied out once; bytes read while someone waits go straight into the destination.

No encryption: with a cluster token set (CURVE), nodes do not use this channel at all. Bytes
travel in the machine's byte order (little-endian, like the ZeroMQ frames; big-endian hosts are
not supported). Errors are ``OSError``; the callers translate them into the library's errors.
"""

from __future__ import annotations

import logging
import secrets
import select
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

__all__ = ["MIN_BYTES", "Channel", "Listener"]

log = logging.getLogger(__name__)

# Payloads below this stay in ZeroMQ frames: the copy out of libzmq's buffer costs little there.
MIN_BYTES = 1 << 20
_MAGIC = b"PSBULK01"
_HELLO = len(_MAGIC) + 8  # magic, then the ticket as a little-endian u64
_ACK = b"\x01"
_TICKETS = 1024  # outstanding tickets kept per server (oldest dropped)
READ_AHEAD = 32 << 20  # bytes a connection reads before anyone asks for them, at most
_CHUNK = 1 << 20  # read-ahead memory comes in pieces of this size
_TICK = 0.2  # how often a waiting I/O thread looks whether it was closed


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exactly(sock: socket.socket, buf: memoryview, idle: float, what: str) -> None:
    """Fill ``buf`` from ``sock``; OSError if the peer closes, or sends nothing for ``idle``
    seconds (TimeoutError), naming ``what`` and how far it got."""
    got, n = 0, buf.nbytes
    try:
        sock.settimeout(idle)
        while got < n:
            r = sock.recv_into(buf[got:], n - got)
            if not r:
                raise ConnectionError(f"{what}: connection closed after {got} of {n} bytes")
            got += r
    except TimeoutError:
        raise TimeoutError(
            f"{what}: {got} of {n} bytes received, then nothing for {idle:g}s"
        ) from None
    except ConnectionError:
        raise
    except OSError as exc:
        raise ConnectionError(f"{what}: {exc} after {got} of {n} bytes") from None


def _poll(sock: socket.socket, event: int, seconds: float) -> bool:
    """Whether ``sock`` became ready for ``event`` (POLLIN, POLLOUT) within ``seconds``."""
    p = select.poll()
    p.register(sock.fileno(), event | select.POLLERR | select.POLLHUP)
    return bool(p.poll(seconds * 1000))


class _Reader(threading.Thread):
    """Reads one connection ahead (into pieces of memory of its own, up to ``READ_AHEAD``
    bytes), or, while :meth:`read_into` waits and nothing is staged, straight into the
    destination. The socket must be non-blocking."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        super().__init__(name=f"bulk reader {name}", daemon=True)
        self.sock = sock
        self.cond = threading.Condition()
        self.chunks: deque[list[Any]] = deque()  # [bytearray, start, end]: staged bytes
        self.staged = 0
        self.target: memoryview | None = None  # where the waiting reader wants bytes
        self.filled = 0  # bytes of target filled
        self.error: str | None = None
        self.closed = False
        self.seen = time.monotonic()  # when bytes last arrived

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and self.target is None and self.staged >= READ_AHEAD:
                    self.cond.wait(_TICK)
                if self.closed or self.error is not None:
                    return
                direct = self.target is not None and not self.staged
                target, off = self.target, self.filled
                if not direct:
                    if not self.chunks or self.chunks[-1][2] == len(self.chunks[-1][0]):
                        self.chunks.append([bytearray(_CHUNK), 0, 0])
                    tail = self.chunks[-1]
                    view = memoryview(tail[0])[tail[2] :]
            if not _poll(self.sock, select.POLLIN, _TICK):
                continue
            try:
                if direct:
                    assert target is not None
                    n = self.sock.recv_into(target[off:])
                else:
                    n = self.sock.recv_into(view)
                if not n:
                    raise ConnectionError("connection closed by the peer")
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                with self.cond:
                    self.error = str(exc) or type(exc).__name__
                    self.cond.notify_all()
                return
            with self.cond:
                self.seen = time.monotonic()
                if direct:
                    self.filled += n
                else:
                    tail[2] += n
                    self.staged += n
                self.cond.notify_all()

    def read_into(self, buf: memoryview, idle: float, what: str) -> None:
        """Fill ``buf``; ConnectionError if the connection broke, TimeoutError if nothing
        arrived for ``idle`` seconds (both name ``what`` and how far it got)."""
        n, pos = buf.nbytes, 0
        with self.cond:
            self.seen = max(self.seen, time.monotonic())
            try:
                while pos < n:
                    while self.staged and pos < n:
                        c = self.chunks[0]
                        k = min(c[2] - c[1], n - pos)
                        buf[pos : pos + k] = memoryview(c[0])[c[1] : c[1] + k]
                        c[1] += k
                        pos += k
                        self.staged -= k
                        # the reader thread appends to the last piece while it has room
                        if c[1] == c[2] and (c[2] == len(c[0]) or len(self.chunks) > 1):
                            self.chunks.popleft()
                    if pos == n:
                        break
                    self.target, self.filled = buf[pos:], 0
                    self.cond.notify_all()
                    while self.filled < n - pos and not self.staged:
                        if self.error is not None:
                            raise ConnectionError(
                                f"{what}: {self.error} after {pos + self.filled} of {n} bytes"
                            )
                        if self.closed:
                            raise ConnectionError(f"{what}: connection closed")
                        if time.monotonic() - self.seen > idle:
                            raise TimeoutError(
                                f"{what}: {pos + self.filled} of {n} bytes received, then "
                                f"nothing for {idle:g}s"
                            )
                        self.cond.wait(min(_TICK, idle))
                    pos += self.filled
                    self.target, self.filled = None, 0
            finally:
                self.target = None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.chunks.clear()
            self.staged = 0
            self.cond.notify_all()


class _Writer(threading.Thread):
    """Sends the payloads queued by :meth:`send` in order, so that the caller (a worker's sends
    to other servers, a server's event loop) need not wait for the link. The socket must be
    non-blocking."""

    def __init__(self, sock: socket.socket, name: str, idle: float) -> None:
        super().__init__(name=f"bulk writer {name}", daemon=True)
        self.sock, self.idle, self.where = sock, idle, name
        self.cond = threading.Condition()
        self.sending = threading.Lock()  # held while a send reads a payload's memory
        self.queue: deque[list[Any]] = deque()  # [bytes left, owner, what]
        self.error: str | None = None
        self.closed = False

    def send(self, data: memoryview, what: str, owner: object = None) -> None:
        with self.cond:
            if self.error is not None:
                raise ConnectionError(f"{what}: {self.error}")
            if self.closed:
                raise ConnectionError(f"{what}: the bulk channel to {self.where} is closed")
            self.queue.append([data.cast("B") if data.format != "B" else data, owner, what])
            self.cond.notify_all()

    def release(self, owner: object) -> None:
        """Copy the unsent part of every payload viewing ``owner``'s memory."""
        with self.sending, self.cond:
            for item in self.queue:
                if item[1] is owner:
                    item[0], item[1] = memoryview(bytes(item[0])), None

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait(_TICK)
                if self.closed:
                    return
            try:
                self._send_head()
            except OSError as exc:
                with self.cond:
                    self.error = str(exc)
                    self.queue.clear()
                log.warning("%s; bulk channel to %s closed", exc, self.where)
                # the peer sees the connection end: it refuses the payload it was reading
                with _suppress_oserror():
                    self.sock.shutdown(socket.SHUT_RDWR)
                return

    def _send_head(self) -> None:
        last = time.monotonic()
        while True:
            with self.cond:
                if self.closed:
                    raise ConnectionError(f"the bulk channel to {self.where} was closed")
                item = self.queue[0]
                if not item[0].nbytes:
                    self.queue.popleft()
                    return
            if not _poll(self.sock, select.POLLOUT, _TICK):
                if time.monotonic() - last > self.idle:
                    raise TimeoutError(
                        f"{item[2]}: {self.where} took nothing for {self.idle:g}s "
                        f"({item[0].nbytes} bytes left)"
                    )
                continue
            with self.sending:
                view = item[0]  # release() may have replaced it by a copy
                try:
                    n = self.sock.send(view)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    raise ConnectionError(f"{item[2]}: {exc}") from None
                item[0] = view[n:]
            last = time.monotonic()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.queue.clear()
            self.cond.notify_all()


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return isinstance(exc, OSError)


class Channel:
    """A worker's bulk connection to one server.

    Example:
        ch = Channel.open("10.0.0.5", port, ticket, idle=5.0, where="server[0]")
        ch.send(memoryview(grad).cast("B"), "push of 'w'")
    """

    def __init__(self, sock: socket.socket, where: str, idle: float) -> None:
        self.sock = sock
        self.where = where
        self.idle = idle
        sock.setblocking(False)
        self.reader = _Reader(sock, where)
        self.writer = _Writer(sock, where, idle)
        self.reader.start()
        self.writer.start()

    @classmethod
    def open(cls, host: str, port: int, ticket: int, *, idle: float, where: str) -> Channel:
        """Connect, present ``ticket`` and wait for the server's acknowledgement."""
        sock = socket.create_connection((host, port), timeout=idle)
        try:
            _tune(sock)
            sock.sendall(_MAGIC + ticket.to_bytes(8, "little"))
            ack = bytearray(1)
            recv_exactly(sock, memoryview(ack), idle, f"bulk channel to {where}: acknowledgement")
            if bytes(ack) != _ACK:
                raise ConnectionError(f"bulk channel to {where}: refused")
        except BaseException:
            sock.close()
            raise
        return cls(sock, where, idle)

    def send(self, data: memoryview, what: str) -> None:
        """Queue all of ``data`` for sending and return: it goes out behind what was queued
        before, while the caller goes on (to send to other servers). ``data`` must not change
        until its request is answered (the server answers once it has read all of it).
        ConnectionError if an earlier payload could not be sent (the channel is broken: the
        server refuses that payload's request)."""
        self.writer.send(data, what)

    def recv_into(self, buf: memoryview, what: str) -> None:
        self.reader.read_into(buf, self.idle, f"{what} from {self.where}")

    def close(self) -> None:
        self.writer.close()
        self.reader.close()
        with _suppress_oserror():
            self.sock.shutdown(socket.SHUT_RDWR)
        for t in (self.writer, self.reader):
            if t.is_alive() and t is not threading.current_thread():
                t.join(2 * _TICK + 1.0)
        self.sock.close()


@dataclass
class _Conn:
    sock: socket.socket
    identity: bytes
    rank: int
    reader: _Reader
    writer: _Writer  # writes the replies' payloads while the event loop goes on


class Listener:
    """A server's bulk port: tickets, accepted connections and their pending writes.

    The server's event loop polls :meth:`fds` and passes the events to :meth:`handle`.

    Example:
        bulk = Listener("127.0.0.1", idle=5.0)
        ticket = bulk.ticket(identity, rank)          # sent to the worker over ZeroMQ
    """

    def __init__(self, host: str, *, idle: float, name: str = "server") -> None:
        self.idle = idle
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.bind(("" if host in ("0.0.0.0", "*") else host, 0))
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
        return [self.sock.fileno(), *self._hello], []

    def handle(self, fd: int, readable: bool, writable: bool) -> None:
        if fd == self.sock.fileno():
            self._accept()
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

    def recv(self, identity: bytes, buf: memoryview, what: str) -> None:
        """Read a payload of ``buf.nbytes`` from the worker at ``identity`` into ``buf``,
        blocking until it is there: the worker sends it right behind its header. On OSError
        the connection is closed (its byte stream is no longer in step with the headers)."""
        c = self._by_identity.get(identity)
        if c is None:
            raise ConnectionError(f"{what}: no bulk connection from this worker")
        try:
            c.reader.read_into(buf, self.idle, what)
        except BaseException as exc:  # out of step with the headers now, whatever happened
            self._drop(c, str(exc))
            raise

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
        self.sock.close()

    # ---- internals ------------------------------------------------------------------------

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
            data = sock.recv(_HELLO - len(got))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        got += data
        if data and len(got) < _HELLO:
            return
        del self._hello[fd]
        entry = None
        if len(got) == _HELLO and got.startswith(_MAGIC):
            entry = self._tickets.pop(int.from_bytes(got[len(_MAGIC) :], "little"), None)
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
        c = _Conn(sock, identity, rank, _Reader(sock, where), _Writer(sock, where, self.idle))
        c.reader.start()
        c.writer.start()
        self._by_fd[fd] = c
        self._by_identity[identity] = c
        log.debug("%s: bulk connection of worker[%d] open", self.name, rank)

    def _drop(self, c: _Conn, reason: str | None) -> None:
        if reason is not None:
            log.warning("%s: bulk connection of worker[%d] closed: %s", self.name, c.rank, reason)
        self._by_fd.pop(c.sock.fileno(), None)
        if self._by_identity.get(c.identity) is c:
            del self._by_identity[c.identity]
        c.reader.close()
        c.writer.close()
        with c.writer.sending, _suppress_oserror():
            c.sock.shutdown(socket.SHUT_RDWR)
        for t in (c.reader, c.writer):
            if t.is_alive():
                t.join(2 * _TICK + 1.0)
        c.sock.close()
