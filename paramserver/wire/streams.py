"""The two threads of a bulk connection: one reads it ahead, one writes the payloads queued
for it, so that several connections' transfers go on at once and no caller waits on a link.
A server's event loop never waits on a reader either: it takes a payload that is all there
(:meth:`Reader.take`: read ahead, or left in the socket below the reader's ``hold`` and read by
the loop itself), or hands the reader the buffer to fill (:meth:`Reader.begin`) and is woken
once it is full.
With a :class:`~paramserver.wire.seal.Seal` they read and write sealed records instead of raw
bytes (the cluster token's encrypted fast path): the reader thread opens each record as it
arrives (straight into the waiting buffer, or into read-ahead memory), so what callers take is
plaintext that passed authentication, and the last record's open is all that lies between a
payload's last byte and its use.

Example:
    reader, writer = Reader(sock, "server[0]"), Writer(sock, "server[0]", idle=5.0)
    reader.start(); writer.start()
    writer.send(memoryview(grad).cast("B"), "push of 'w'")
    reader.read_into(memoryview(out).cast("B"), 5.0, "pull of 'w'")   # a worker: blocking
    if not reader.take(buf, "push of 'w'"):                          # a server: never blocking
        reader.begin(buf, wake)      # wake() once buf is full or the connection broke
"""

from __future__ import annotations

import fcntl
import select
import socket
import sys
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from paramserver.wire.seal import HEAD, RECORD, TAG, Seal, record_length, wire_size
from paramserver.wire.writer import TICK as _TICK
from paramserver.wire.writer import Writer, poll_ready, suppress_oserror

__all__ = ["JOIN", "READ_AHEAD", "Reader", "Writer", "poll_ready", "suppress_oserror"]


READ_AHEAD = 32 << 20  # bytes a connection reads before anyone asks for them, at most
_CHUNK = 1 << 20  # read-ahead memory comes in pieces of this size
_SPARE = 4  # pieces a connection keeps for reuse once read out
# bytes/s: a payload slower than this, past its ``idle`` grace, is dropped; a peer that sends a
# byte now and then would otherwise hold whoever waits for its payload without end
MIN_RATE = 1 << 20
JOIN = 2 * _TICK + 1.0  # how long closing waits for a connection's thread


class Reader(threading.Thread):
    """Reads one connection ahead (into pieces of memory of its own, up to ``READ_AHEAD``
    bytes), or, while :meth:`read_into` waits and nothing is staged, straight into the
    destination. The socket must be non-blocking."""

    def __init__(
        self, sock: socket.socket, name: str, seal: Seal | None = None, hold: int = 0
    ) -> None:
        """``hold``: bytes the socket keeps to itself before the thread reads them ahead
        (SO_RCVLOWAT; 0: it reads every byte as it comes). A payload below it that came before
        its header stays in the socket, and :meth:`take` reads it straight into its buffer:
        no wake-up of this thread, no copy out of read-ahead memory."""
        super().__init__(name=f"bulk reader {name}", daemon=True)
        self.sock = sock
        self.seal = seal  # records to open, or None: raw bytes
        self.hold = hold if seal is None else 0  # (sealed records are opened by the thread)
        # the sealed record being read (length, ciphertext, tag), and how much of it is in
        self.record = memoryview(bytearray(HEAD + RECORD + TAG) if seal is not None else b"")
        self.have = self.length = 0
        self.lowat = 0  # what SO_RCVLOWAT is set to now (sealed: the rest of the record)
        # bytes still read and dropped after a record failed authentication (the error is kept
        # for the payload's reader): the sender's flush ends, and its header comes and is
        # refused, as when records were opened only once all were in
        self.drain = 0
        self._lowat(self.hold)
        self.cond = threading.Condition()
        self.chunks: deque[list[Any]] = deque()  # [bytearray, start, end]: staged bytes
        # pieces read out, kept for the next payloads: a fresh one is zeroed and faulted in
        # page by page (0.1-0.3 ms a MiB, on every payload read ahead)
        self.spare: list[bytearray] = []
        self.staged = 0
        self.target: memoryview | None = None  # where the waiting reader wants bytes
        self.filled = 0  # bytes of target filled
        self.error: str | None = None
        self.closed = False
        self.seen = time.monotonic()  # when bytes last arrived
        self.begun = 0  # bytes of the payload :meth:`begin` started that came from read-ahead
        self.wake: Callable[[], None] | None = None  # called once a begun payload is in
        # held while a recv writes into ``target``: whoever takes a target back that the thread
        # may be filling (:meth:`settle`) takes it first, so no byte lands after it let go
        self.reading = threading.Lock()
        self.claimed = False  # a caller reads into ``target`` itself (settle)
        self.want = 0  # bytes of ``target`` a caller waits for, if fewer than all (settle, sealed)

    def run(self) -> None:
        while True:
            with self.cond:
                # (while a caller reads the socket itself, see settle, the thread stays out)
                while not self.closed and (
                    self.claimed or (self._full() and self.staged >= READ_AHEAD)
                ):
                    self.cond.wait(_TICK)
                if self.closed or (self.error is not None and not self.drain):
                    return
            if self.seal is not None:
                self._lowat_record()
            if not poll_ready(self.sock, select.POLLIN, _TICK):
                continue
            if self.seal is not None:
                with self.reading:
                    if not self._recv_sealed():
                        return
                continue
            # where the bytes go is decided once they are here: a buffer given while the thread
            # polled (a pull's sink: expect) takes them, not staging and a copy out of it
            with self.reading:  # a target is taken back (settle) only between two reads
                with self.cond:
                    # straight into the waiting reader's buffer while it has room (a full one
                    # has not been taken back yet: what comes now belongs to the next payload)
                    target, off, tail = self.target, self.filled, None
                    if target is None or self.staged or off >= target.nbytes:
                        target = None
                        if not self.chunks or self.chunks[-1][2] == len(self.chunks[-1][0]):
                            piece = self.spare.pop() if self.spare else bytearray(_CHUNK)
                            self.chunks.append([piece, 0, 0])
                        tail = self.chunks[-1]
                if not self._recv(target, off, tail):
                    return
            # (no reference kept while polling: the buffer's owner may reuse it once nobody holds it)
            target = tail = None

    def _recv(self, target: memoryview | None, off: int, tail: list[Any] | None) -> bool:
        """Read what the socket holds into ``target[off:]``, or else the staging piece
        ``tail``; False once the connection broke (the error is kept, waiters woken)."""
        direct = target is not None
        try:
            if target is not None:
                n = self._recv_some(target[off:])
            else:
                assert tail is not None
                n = self._recv_some(memoryview(tail[0])[tail[2] :])
        except OSError as exc:
            return self._broke(str(exc) or type(exc).__name__)
        if not n:
            return True
        with self.cond:
            self.seen = time.monotonic()
            if direct:
                self.filled += n
            else:
                assert tail is not None
                tail[2] += n
                self.staged += n
                if not self._full():  # read just before the target was set: it is its
                    assert self.target is not None
                    self.filled = self._take(self.target, self.filled)
            # a reader waiting on its buffer is woken once it is full, not by every piece
            # (each wake-up took the GIL from this thread; its timeouts tick anyway)
            if self._full() and self.target is not None:
                self._wake()
                self.cond.notify_all()
            elif not direct:
                self.cond.notify_all()
        return True

    def _recv_some(self, buf: memoryview) -> int:
        """What the socket holds, read into ``buf``: how many bytes (0: none there now);
        OSError (ConnectionError once the peer closed it) if the connection broke."""
        try:
            n = self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return 0
        if not n:
            raise ConnectionError("connection closed by the peer")
        return n

    def _broke(self, why: str) -> bool:
        """Keep why the connection broke and wake whoever waits; False (the thread ends)."""
        with self.cond:
            self.error = why
            self.cond.notify_all()
            self._wake()
        return False

    def _recv_sealed(self) -> bool:
        """Read what the socket holds of the current sealed record; once all of it is in, open
        it (authenticated, or the connection is broken) straight into the waiting reader's
        buffer if it fits there, else into read-ahead memory. False once the connection broke.
        Only plaintext that passed authentication is ever counted as filled or staged."""
        assert self.seal is not None
        rec = self.record
        if self.drain:
            try:
                n = self.sock.recv_into(rec, min(self.drain, rec.nbytes))
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                n = 0
            self.drain = self.drain - n if n else 0
            return self.drain > 0
        while True:  # the length, then (without another poll) the rest of the record
            need = HEAD if self.have < HEAD else HEAD + self.length + TAG
            try:
                n = self._recv_some(rec[self.have : need])
            except OSError as exc:
                return self._broke(str(exc) or type(exc).__name__)
            if not n:
                return True
            self.have += n
            if self.have != HEAD:
                break
            try:
                self.length = record_length(rec[:HEAD], self.seal.count)
            except ConnectionError as exc:
                return self._broke(str(exc))
        with self.cond:
            self.seen = time.monotonic()
            if self.have < need:
                return True
            k = self.length
            target, off = self.target, self.filled
            if target is not None and not self.staged and off + k <= target.nbytes:
                dest, tail = target[off : off + k], None
            else:
                target = None
                if not self.chunks or len(self.chunks[-1][0]) - self.chunks[-1][2] < k:
                    piece = self.spare.pop() if self.spare else bytearray(_CHUNK)
                    self.chunks.append([piece, 0, 0])
                tail = self.chunks[-1]
                dest = memoryview(tail[0])[tail[2] : tail[2] + k]
        # (outside the lock: the open lets go of the GIL, and the caller may take staged bytes)
        try:
            self.seal.open(rec[: self.have], dest)
        except ConnectionError as exc:
            self.drain = READ_AHEAD
            self._broke(str(exc))
            return True
        self.have = 0
        with self.cond:
            if target is not None:
                if self.target is not target:  # given up while it arrived: out of step
                    self.error = "a payload was given up while it arrived"
                    self.cond.notify_all()
                    self._wake()
                    return False
                self.filled += k
            else:
                assert tail is not None
                tail[2] += k
                self.staged += k
                if not self._full():  # the target was set while the record was opened
                    assert self.target is not None
                    self.filled = self._take(self.target, self.filled)
            if self.target is not None and self.filled >= (self.want or self.target.nbytes):
                self._wake()
                self.cond.notify_all()
            elif target is None:
                self.cond.notify_all()
        return True

    def _lowat_record(self) -> None:
        """Sealed: wake the thread's poll only once the rest of the record being read is in
        the socket (the kernel caps it at half its buffer; a closed or broken connection wakes
        it anyway): one wake-up a record, not one for every few segments that arrive."""
        if self.drain:
            rest = 1
        elif self.have < HEAD:
            rest = HEAD - self.have
        else:
            rest = HEAD + self.length + TAG - self.have
        if rest != self.lowat:
            self.lowat = rest
            self._lowat(rest)

    def _lowat(self, n: int) -> None:
        """Wake the thread's poll only once ``n`` bytes wait in the socket (0: leave it)."""
        if n:
            with suppress_oserror():  # not on this system: every byte is read ahead
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)

    def _queued(self) -> int:
        """Bytes that wait in the socket, not read yet (0 if the system does not say)."""
        try:
            got = fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, bytes(4))
        except OSError:
            return 0
        return int.from_bytes(got, sys.byteorder)

    def _full(self) -> bool:
        """Whether no one waits for bytes (no target, or a full one not taken back yet)."""
        return self.target is None or self.filled >= self.target.nbytes

    def _wake(self) -> None:
        wake, self.wake = self.wake, None
        if wake is not None:
            wake()

    def _take(self, buf: memoryview, pos: int) -> int:
        """Copy staged bytes into ``buf`` from ``pos`` on (as many as there are and fit); the
        new position. Call with ``cond`` held."""
        n = buf.nbytes
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
                if len(self.spare) < _SPARE and len(c[0]) == _CHUNK:
                    self.spare.append(c[0])
        return pos

    # ---- a server's loop: never waits ---------------------------------------------------------

    def wire_size(self, n: int) -> int:
        """The bytes a payload of ``n`` takes on the connection (sealed: a length and a tag
        per record)."""
        return n if self.seal is None else wire_size(n)

    def take(self, buf: memoryview, what: str) -> bool:
        """Fill ``buf`` with the next payload if all of it was read ahead already (the common
        case on a fast link; sealed: opened already); False, and nothing taken, if not."""
        with self.cond:
            if not self._full():
                return False
            if self.staged >= buf.nbytes:
                self._take(buf, 0)
                return True
            if not self.hold or self.staged + self._queued() < buf.nbytes:
                return False
        # the rest waits in the socket (held there, see ``hold``): read here, straight in; it
        # is there already, so a pause of one tick means the connection broke (its owner
        # closes it: the bytes taken so far put it out of step)
        with self.reading:  # the thread reads nothing meanwhile
            with self.cond:
                pos = self._take(buf, 0)
                self.seen = now = time.monotonic()
            self._recv_exactly(buf, pos, _TICK, what, now + _TICK + buf.nbytes / MIN_RATE)
        return True

    def begin(self, buf: memoryview, wake: Callable[[], None]) -> None:
        """Start reading the next payload (``buf.nbytes`` bytes; sealed: opened record by
        record as they come) into ``buf`` without waiting: what was read ahead is copied now,
        the thread reads the rest straight in and calls ``wake()`` (from its own thread) once
        ``buf`` is full or the connection broke. :meth:`progress` says how far it got;
        :meth:`end` once it is over."""
        if self.seal is None:  # (sealed: the thread sets it, a record at a time)
            self._lowat(1)  # the thread reads the rest as it comes (setting it wakes its poll)
        with self.cond:
            self.seen = max(self.seen, time.monotonic())
            self.begun = self._take(buf, 0)
            self.target, self.filled, self.wake = buf[self.begun :], 0, wake
            if self.error is not None or self.filled >= self.target.nbytes:
                self._wake()  # broke before (a record failed), or all in already
            self.cond.notify_all()

    def progress(self) -> tuple[int, bool, str | None]:
        """Of the payload :meth:`begin` started: (bytes in, whether all are, why the connection
        broke (None: it did not)); and ``seen`` says when bytes last came."""
        with self.cond:
            got = self.begun + self.filled
            full = self.target is not None and self.filled >= self.target.nbytes
            why = self.error or ("connection closed" if self.closed else None)
            return got, full, why

    def end(self) -> None:
        """The payload :meth:`begin` started is over (read, or given up)."""
        self._lowat(self.hold)
        with self.cond:
            self.target, self.filled, self.begun, self.wake = None, 0, 0, None
            self.cond.notify_all()

    # ---- a worker: waits, with a deadline -----------------------------------------------------

    def read_into(self, buf: memoryview, idle: float, what: str) -> None:
        """Fill ``buf`` with the next payload; ConnectionError if the connection broke or (with
        a seal) a record failed authentication, TimeoutError if nothing arrived for ``idle``
        seconds, or the payload came slower than ``MIN_RATE`` after ``idle`` seconds of grace
        (all name ``what`` and how far it got)."""
        deadline = time.monotonic() + idle + self.wire_size(buf.nbytes) / MIN_RATE
        self._read(buf, idle, what, deadline)

    def _read(self, buf: memoryview, idle: float, what: str, deadline: float) -> None:
        n, pos = buf.nbytes, 0
        with self.cond:
            self.seen = max(self.seen, time.monotonic())
            try:
                while pos < n:
                    pos = self._take(buf, pos)
                    if pos == n:
                        break
                    self.target, self.filled = buf[pos:], 0
                    self.cond.notify_all()
                    while self.filled < n - pos and not self.staged:
                        self._wait(pos + self.filled, n, idle, what, deadline)
                    pos += self.filled
                    self.target, self.filled = None, 0
            finally:
                self.target = None

    def _wait(self, got: int, n: int, idle: float, what: str, deadline: float) -> None:
        """Wait on ``cond`` (held) for more bytes of a payload of ``n`` that has ``got``;
        ConnectionError or TimeoutError as :meth:`read_into` says."""
        self._wait_check(got, n, idle, what, deadline)
        self.cond.wait(min(_TICK, idle))

    def _wait_check(self, got: int, n: int, idle: float, what: str, deadline: float) -> None:
        """ConnectionError or TimeoutError if a payload of ``n`` that has ``got`` can wait no
        longer (see :meth:`read_into`). Call with ``cond`` held."""
        if self.error is not None:
            raise ConnectionError(f"{what}: {self.error} after {got} of {n} bytes")
        if self.closed:
            raise ConnectionError(f"{what}: connection closed")
        now = time.monotonic()
        if now > deadline:
            raise ConnectionError(
                f"{what}: {got} of {n} bytes received, slower than the least rate of "
                f"{MIN_RATE} bytes/s (after {idle:g}s of grace)"
            )
        if now - self.seen > idle:
            raise TimeoutError(f"{what}: {got} of {n} bytes received, then nothing for {idle:g}s")

    # ---- a worker whose request's answer comes on this connection -----------------------------

    def expect(self, buf: memoryview) -> bool:
        """Have the thread read the next payload straight into ``buf`` as it comes, before its
        header is there (a pull's reply: its payload is sent ahead of the header, and was
        otherwise read ahead and copied once more; sealed: opened into it). Only when nothing
        else is staged or expected; whether it took. Then :meth:`settle` once the header says
        how long the payload is (or that none comes)."""
        with self.cond:
            if self.target is not None or self.staged:
                return False
            self.seen = max(self.seen, time.monotonic())
            self.target, self.filled = buf, 0
            self.cond.notify_all()
            return True

    def settle(self, n: int, idle: float, what: str) -> None:
        """End what :meth:`expect` started: wait until the first ``n`` bytes (at most the
        buffer's size) are in the buffer, then take the buffer back; bytes beyond them belong
        to later payloads and are staged again. ``n`` = 0: no payload came (an error answer,
        a request given up). ConnectionError or TimeoutError as :meth:`read_into` says; the
        buffer is taken back in any case.

        The caller reads what is still missing itself: it waits anyway, and a hand-over to the
        thread (woken, then waking the caller) costs two scheduler wake-ups a payload, which
        on a busy machine take longer than the read. Sealed records are opened by the thread
        only (it alone knows where a record begins): the caller waits for them."""
        if self.seal is not None:
            self._settle_sealed(n, idle, what)
            return
        with self.reading:  # the thread reads no more into the buffer meanwhile
            try:
                with self.cond:
                    target = self.target
                    assert target is not None and n <= target.nbytes
                    self.claimed = True
                    self.seen = max(self.seen, time.monotonic())
                    got = self.filled
                if got < n:
                    deadline = time.monotonic() + idle + n / MIN_RATE
                    self._recv_exactly(target[:n], got, idle, what, deadline)
                    with self.cond:
                        self.filled = n
            finally:
                with self.cond:
                    if self.target is not None and self.filled > n:
                        extra = bytearray(self.target[n : self.filled])
                        self.chunks.appendleft([extra, 0, len(extra)])
                        self.staged += len(extra)
                    self.target, self.filled, self.claimed = None, 0, False
                    self.cond.notify_all()

    def _settle_sealed(self, n: int, idle: float, what: str) -> None:
        """:meth:`settle` on a sealed connection: wait for the thread to open the records of
        ``n`` bytes into the buffer."""
        try:
            with self.cond:
                target = self.target
                assert target is not None and n <= target.nbytes
                self.seen = max(self.seen, time.monotonic())
                deadline = time.monotonic() + idle + wire_size(n) / MIN_RATE
                self.want = n
                while self.filled < n:
                    if self.staged:  # (a record that did not fit the buffer's room)
                        self.filled = self._take(target, self.filled)
                    else:
                        self._wait(self.filled, n, idle, what, deadline)
        finally:
            # the buffer is taken back between two records (the next payload's may be going
            # into its room beyond ``n`` now): what is there beyond ``n`` is staged again
            with self.reading, self.cond:
                if self.target is not None and self.filled > n:
                    extra = bytearray(self.target[n : self.filled])
                    self.chunks.appendleft([extra, 0, len(extra)])
                    self.staged += len(extra)
                self.target, self.filled, self.want = None, 0, 0
                self.cond.notify_all()

    def _recv_exactly(
        self, buf: memoryview, got: int, idle: float, what: str, deadline: float
    ) -> None:
        """Read ``buf[got:]`` from the socket in the caller's thread (``reading`` held, so the
        thread reads nothing meanwhile); ConnectionError or TimeoutError as :meth:`_wait`
        says (a broken connection is kept as the reader's error)."""
        n = buf.nbytes
        while got < n:
            with self.cond:
                self._wait_check(got, n, idle, what, deadline)
            try:
                r = self.sock.recv_into(buf[got:], n - got)
            except (BlockingIOError, InterruptedError):
                poll_ready(self.sock, select.POLLIN, min(_TICK, idle))
                continue
            except OSError as exc:
                r, error = 0, str(exc) or type(exc).__name__
            else:
                error = "connection closed by the peer"
            with self.cond:
                if not r:
                    self.error = error
                    self.cond.notify_all()
                    raise ConnectionError(f"{what}: {error} after {got} of {n} bytes")
                self.seen = time.monotonic()
            got += r

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.chunks.clear()
            self.spare.clear()
            self.staged = 0
            self.cond.notify_all()
