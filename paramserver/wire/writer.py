"""The writing thread of a bulk connection (:class:`Writer`: its queue of payloads, sealed
record by record with a cluster token), and what both of a connection's threads use to wait on
its socket.

Example:
    writer = Writer(sock, "server[0]", idle=5.0)
    writer.start()
    writer.send(memoryview(grad).cast("B"), "push of 'w'")
    writer.flush(5.0, "push of 'w'")
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import deque
from typing import Any

from paramserver.wire.seal import HEAD, RECORD, TAG, Seal

__all__ = ["TICK", "Writer", "poll_ready", "suppress_oserror"]

log = logging.getLogger(__name__)

TICK = 0.2  # how often a waiting I/O thread looks whether it was closed


def poll_ready(sock: socket.socket, event: int, seconds: float) -> bool:
    """Whether ``sock`` became ready for ``event`` (POLLIN, POLLOUT) within ``seconds``."""
    p = select.poll()
    p.register(sock.fileno(), event | select.POLLERR | select.POLLHUP)
    return bool(p.poll(seconds * 1000))


class Writer(threading.Thread):
    """Sends the payloads queued by :meth:`send` in order, so that the caller (a worker's sends
    to other servers, a server's event loop) need not wait for the link. The socket must be
    non-blocking."""

    def __init__(
        self, sock: socket.socket, name: str, idle: float, seal: Seal | None = None
    ) -> None:
        super().__init__(name=f"bulk writer {name}", daemon=True)
        self.sock, self.idle, self.where = sock, idle, name
        self.seal = seal  # records to seal, or None: raw bytes
        self.sealed = bytearray(HEAD + RECORD + TAG) if seal is not None else bytearray()
        self.cond = threading.Condition()
        self.sending = threading.Lock()  # held while a send reads a payload's memory
        self.queue: deque[list[Any]] = deque()  # [bytes left, owner, what]
        self.error: str | None = None
        self.closed = False
        self.progress = time.monotonic()  # when bytes last went out

    def send(self, data: memoryview, what: str, owner: object = None) -> None:
        data = data.cast("B") if data.format != "B" else data
        with self.sending, self.cond:  # the order release() takes them in
            if self.error is not None:
                raise ConnectionError(f"{what}: {self.error}")
            if self.closed:
                raise ConnectionError(f"{what}: the bulk channel to {self.where} is closed")
            if not self.queue and self.seal is None:
                # nothing ahead of it: what the socket takes now goes out from this thread
                # (a 1 MiB push mostly whole), without waking the writer thread and waiting for
                # it (the hop halved push+pull of 1 MiB over TCP); the rest is queued
                with suppress_oserror():  # a broken link: the writer thread finds and says it
                    n = self.sock.send(data)
                    data = data[n:]
                    self.progress = time.monotonic()
                if not data.nbytes:
                    return
            self.queue.append([data, owner, what])
            self.cond.notify_all()

    def flush(self, idle: float, what: str) -> None:
        """Wait until everything queued is written; ConnectionError if the connection broke,
        TimeoutError if nothing went out for ``idle`` seconds."""
        with self.cond:
            self.progress = max(self.progress, time.monotonic())
            while self.queue:
                if self.error is not None:
                    raise ConnectionError(f"{what}: {self.error}")
                if self.closed:
                    raise ConnectionError(f"{what}: the bulk channel to {self.where} is closed")
                if time.monotonic() - self.progress > idle:
                    raise TimeoutError(f"{what}: {self.where} took nothing for {idle:g}s")
                self.cond.wait(min(TICK, idle))
            if self.error is not None:
                raise ConnectionError(f"{what}: {self.error}")

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
                    self.cond.wait(TICK)
                if self.closed:
                    return
            try:
                self._send_head()
            except OSError as exc:
                with self.cond:
                    self.error = str(exc)
                    self.queue.clear()
                    self.cond.notify_all()
                    if self.closed:  # closed by its owner: nothing went wrong
                        return
                log.warning("%s; bulk channel to %s closed", exc, self.where)
                # the peer sees the connection end: it refuses the payload it was reading
                with suppress_oserror():
                    self.sock.shutdown(socket.SHUT_RDWR)
                return

    def _send_head(self) -> None:
        """Send the payload at the head of the queue (raw, or record by record, sealed)."""
        last = time.monotonic()
        out = memoryview(b"")  # a sealed record still to send
        while True:
            with self.cond:
                if self.closed:
                    raise ConnectionError(f"the bulk channel to {self.where} was closed")
                item = self.queue[0]
                if not item[0].nbytes and not out.nbytes:
                    self.queue.popleft()
                    self.cond.notify_all()
                    return
            if self.seal is not None and not out.nbytes:
                with self.sending:  # the payload's memory is read here only
                    plain = item[0][:RECORD]
                    out = self.seal.seal(plain, self.sealed)
                    item[0] = item[0][plain.nbytes :]
            if not poll_ready(self.sock, select.POLLOUT, TICK):
                if time.monotonic() - last > self.idle:
                    raise TimeoutError(
                        f"{item[2]}: {self.where} took nothing for {self.idle:g}s "
                        f"({item[0].nbytes + out.nbytes} bytes left)"
                    )
                continue
            with self.sending:
                view = out if self.seal is not None else item[0]  # release() may copy item[0]
                try:
                    n = self.sock.send(view)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    raise ConnectionError(f"{item[2]}: {exc}") from None
                if self.seal is not None:
                    out = out[n:]
                else:
                    item[0] = view[n:]
            last = self.progress = time.monotonic()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.queue.clear()
            self.cond.notify_all()


class suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return isinstance(exc, OSError)
