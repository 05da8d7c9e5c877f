"""A server's bulk reader with ``hold`` (SO_RCVLOWAT) on a real loopback TCP connection (a
Unix socket pair ignores the option): a payload below it stays in the socket until ``take``
reads it straight into its buffer; one partly there is not taken, and ``begin`` has the thread
read all of it as it comes; one above it is read ahead as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import sys
import termios
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from paramserver.wire.streams import Reader
from tests.timing import wait_until

pytestmark = pytest.mark.timeout(60)

HOLD = 1 << 20


@contextlib.contextmanager
def _held() -> Iterator[tuple[socket.socket, socket.socket, Reader]]:
    """(the server's end, the peer's end, a started reader with ``HOLD`` on the server's end)
    of a loopback TCP connection; all closed after."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname(), timeout=10)
        ours, _ = listener.accept()
    ours.setblocking(False)
    reader = Reader(ours, "test", hold=HOLD)
    reader.start()
    try:
        yield ours, theirs, reader
    finally:
        reader.close()
        reader.join(5)
        ours.close()
        theirs.close()


def _waiting(sock: socket.socket) -> int:
    """Bytes in ``sock`` that nobody read yet (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)


def test_a_payload_below_the_hold_is_taken_from_the_socket_and_a_partial_one_is_begun() -> None:
    rng = np.random.default_rng(5)
    first, second, third = (rng.integers(0, 256, n, np.uint8).tobytes() for n in (300_000,) * 3)
    with _held() as (ours, theirs, reader):
        # below the hold: the thread reads none of it ahead, take reads it all here
        theirs.sendall(first)
        wait_until(lambda: _waiting(ours) == len(first), 10, "the payload to reach the socket")
        assert reader.staged == 0
        buf = bytearray(len(first))
        assert reader.take(memoryview(buf), "first")
        assert bytes(buf) == first and _waiting(ours) == 0
        # a third of one: nothing taken; begin has the thread read it as it comes
        theirs.sendall(second[:100_000])
        wait_until(lambda: _waiting(ours) == 100_000, 10, "a third of the payload")
        buf = bytearray(len(second))
        assert not reader.take(memoryview(buf), "second")
        assert _waiting(ours) == 100_000 and reader.staged == 0  # nothing taken
        woken = threading.Event()
        reader.begin(memoryview(buf), woken.set)
        wait_until(lambda: reader.progress()[0] == 100_000, 10, "the thread to read the third")
        assert not woken.is_set()
        theirs.sendall(second[100_000:])
        assert woken.wait(10)
        assert reader.progress() == (len(second), True, None)
        reader.end()
        assert bytes(buf) == second
        # held again after end: the next one below it stays in the socket
        theirs.sendall(third)
        wait_until(lambda: _waiting(ours) == len(third), 10, "the next payload in the socket")
        assert reader.staged == 0
        buf = bytearray(len(third))
        assert reader.take(memoryview(buf), "third")
        assert bytes(buf) == third


def test_a_payload_above_the_hold_is_read_ahead_and_taken_whole() -> None:
    payload = np.random.default_rng(6).integers(0, 256, 3 * HOLD, np.uint8).tobytes()
    with _held() as (ours, theirs, reader):
        sender = threading.Thread(target=theirs.sendall, args=(payload,))
        sender.start()
        wait_until(lambda: reader.staged >= HOLD, 10, "the reader to read ahead")
        sender.join(10)
        buf = bytearray(len(payload))
        wait_until(lambda: reader.staged + _waiting(ours) == len(payload), 10, "all of the payload")
        assert reader.take(memoryview(buf), "payload")
        assert bytes(buf) == payload
