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
  the worker is sending them right behind their header) and writes pull payloads without ever
  blocking, driven by the server's event loop.
* :class:`Channel` (worker): one connection to one server.

No encryption: with a cluster token set (CURVE), nodes do not use this channel at all. Bytes
travel in the machine's byte order (little-endian, like the ZeroMQ frames; big-endian hosts are
not supported). Errors are ``OSError``; the callers translate them into the library's errors.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MIN_BYTES", "Channel", "Listener"]

log = logging.getLogger(__name__)

# Payloads below this stay in ZeroMQ frames: the copy out of libzmq's buffer costs little there.
MIN_BYTES = 1 << 20
MIN_RATE = 1 << 20  # bytes/s: a payload slower than this, past ``idle``, is dropped (hardening)
_MAGIC = b"PSBULK01"
_HELLO = len(_MAGIC) + 8  # magic, then the ticket as a little-endian u64
_ACK = b"\x01"
_TICKETS = 1024  # outstanding tickets kept per server (oldest dropped)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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

    def __init__(self, sock: socket.socket, where: str, idle: float) -> None:
        self.sock = sock
        self.where = where
        self.idle = idle

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
        """Send all of ``data``; TimeoutError if the server takes nothing for ``idle`` seconds."""
        sent, n = 0, data.nbytes
        try:
            self.sock.settimeout(self.idle)
            while sent < n:
                sent += self.sock.send(data[sent:])
        except TimeoutError:
            raise TimeoutError(
                f"{what}: {self.where} took {sent} of {n} bytes, then nothing for {self.idle:g}s"
            ) from None
        except OSError as exc:
            raise ConnectionError(f"{what}: {exc} after {sent} of {n} bytes") from None

    def recv_into(self, buf: memoryview, what: str) -> None:
        recv_exactly(self.sock, buf, self.idle, f"{what} from {self.where}")

    def close(self) -> None:
        self.sock.close()


@dataclass
class _Conn:
    sock: socket.socket
    identity: bytes
    rank: int
    # payloads still to write, in order: [bytes left, owner] (owner: whose memory it views)
    queue: deque[list[Any]] = field(default_factory=deque)


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
        reading = [self.sock.fileno(), *self._hello]
        writing = [fd for fd, c in self._by_fd.items() if c.queue]
        return reading, writing

    def handle(self, fd: int, readable: bool, writable: bool) -> None:
        if fd == self.sock.fileno():
            self._accept()
        elif fd in self._hello and readable:
            self._greet(fd)
        elif fd in self._by_fd and writable:
            self._flush(self._by_fd[fd])

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
            recv_exactly(c.sock, buf, self.idle, what)
        except BaseException as exc:  # out of step with the headers now, whatever happened
            self._drop(c, str(exc))
            raise
        finally:
            if c.sock.fileno() >= 0:
                c.sock.setblocking(False)

    def send(self, identity: bytes, data: memoryview, owner: object) -> bool:
        """Queue ``data`` (a view of ``owner``'s memory) for the worker at ``identity`` and
        write what fits now; False if there is no connection to it. Call :meth:`release`
        before ``owner``'s memory changes."""
        c = self._by_identity.get(identity)
        if c is None:
            return False
        c.queue.append([data, owner])
        self._flush(c)
        return True

    def release(self, owner: object) -> None:
        """Copy the unsent part of every payload viewing ``owner``'s memory (which is about to
        change): what a worker receives is the memory as it was when its reply was sent."""
        for c in self._by_fd.values():
            for item in c.queue:
                if item[1] is owner:
                    item[0], item[1] = memoryview(bytes(item[0])), None

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
        c = _Conn(sock, identity, rank)
        self._by_fd[fd] = c
        self._by_identity[identity] = c
        log.debug("%s: bulk connection of worker[%d] open", self.name, rank)

    def _flush(self, c: _Conn) -> None:
        while c.queue:
            item = c.queue[0]
            try:
                n = c.sock.send(item[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(c, f"writing to worker[{c.rank}]: {exc}")
                return
            item[0] = item[0][n:]
            if not item[0].nbytes:
                c.queue.popleft()

    def _drop(self, c: _Conn, reason: str | None) -> None:
        if reason is not None:
            log.warning("%s: bulk connection of worker[%d] closed: %s", self.name, c.rank, reason)
        self._by_fd.pop(c.sock.fileno(), None)
        if self._by_identity.get(c.identity) is c:
            del self._by_identity[c.identity]
        c.queue.clear()
        c.sock.close()
