"""CPU time of one 1 MiB send over a plain loopback TCP connection, no paramserver code.

The reference for ``dense_cpu.py --profile``'s figure of the worker's 1 MiB ``socket.send``:
the same send (non-blocking, TCP_NODELAY, CUBIC as ``bulk.CONGESTION``) from this process to
a child process, timed by the sending thread's CPU clock. ``hold``: the receiver keeps the
payload in its socket (SO_RCVLOWAT 4 MiB, as ``bulk.HOLD``) and reads it once told that all
of it went, as a server's loop does after the header; ``live``: the receiver is already
waiting in ``recv_into`` while the bytes come, as in the tree before the restructure.

    python benchmarks/loopback_send.py --repeat 2000
"""

from __future__ import annotations

import os
import select
import socket
import time

from common import emit, parser

N = 1 << 20


def _pair() -> tuple[socket.socket, socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    with_cc = hasattr(socket, "TCP_CONGESTION")
    if with_cc:
        ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    if with_cc:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
    s, _ = ls.accept()
    ls.close()
    for x in (c, s):
        x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c, s


def _receiver(s: socket.socket, ctl: socket.socket, hold: bool, repeat: int) -> None:
    if hold:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 4 << 20)
    buf = memoryview(bytearray(N))
    for _ in range(repeat):
        if hold:
            ctl.recv(1)  # all of it went: read what the socket holds
        got = 0
        while got < N:
            got += s.recv_into(buf[got:], N - got)
        ctl.send(b"d")


def run(hold: bool, repeat: int) -> float:
    """Mean CPU µs of the sending thread per 1 MiB send."""
    c, s = _pair()
    ctl_a, ctl_b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        c.close()
        try:
            _receiver(s, ctl_b, hold, repeat)
        finally:
            os._exit(0)
    s.close()
    data = memoryview(bytearray(b"\1" * N))
    c.setblocking(False)
    spent = 0.0
    for _ in range(repeat):
        t = time.thread_time()
        sent = 0
        while sent < N:
            try:
                sent += c.send(data[sent:])
            except BlockingIOError:
                select.select([], [c], [], 5.0)
        spent += time.thread_time() - t
        if hold:
            ctl_a.send(b"h")
        ctl_a.recv(1)
    os.waitpid(pid, 0)
    c.close()
    return spent / repeat * 1e6


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    repeat = args.repeat or (50 if args.quick else 2000)
    for hold in (True, False):
        case = "held by the receiver" if hold else "receiver reading"
        emit("loopback_send", f"1 MiB send, {case}: sender CPU", run(hold, repeat), "us")


if __name__ == "__main__":
    main()
