"""Worker program for the bulk-channel fault tests: a worker that fails in the middle of a
transfer on its bulk channel to server[0].

Usage: bulk_worker.py COORDINATOR MODE
  half-push   send a push header and half of its payload, then SIGKILL itself
  no-reading  ask for pulls over the bulk channel, then stop (SIGSTOP) without reading them
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

import paramserver as ps
from paramserver.wire.bulk import Channel
from tests.timing import FAST

N = 4 << 20  # 16 MiB of float32: far more than the socket buffers hold


class HalfThenDie(Channel):
    """A real bulk channel whose sender dies half-way through a payload."""

    def send(self, data: memoryview, what: str) -> None:
        self.sock.setblocking(True)  # a channel's socket is non-blocking (its threads poll)
        self.sock.sendall(data[: data.nbytes // 2])
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    coordinator, mode = sys.argv[1], sys.argv[2]
    timeouts = FAST
    client = ps.connect(coordinator, timeouts=timeouts, transport="tcp")
    w = client.dense_table("w", shape=(N,), optimizer=ps.optim.SGD(lr=1.0))
    w.pull()  # opens the bulk channel
    peer = client._ep.peers["server[0]"]
    assert peer.bulk is not None, "no bulk channel"
    print("ready", flush=True)
    if mode == "half-push":
        peer.bulk = HalfThenDie(peer.bulk.sock, peer.bulk.where, peer.bulk.idle)
        w.push(np.full(N, 1000.0, np.float32))
    elif mode == "no-reading":
        client._ep.poll(0)
        for _ in range(3):
            header = w.pull_header(True, 30.0)
            client._ep.request("server[0]", header, what="pull", bulk=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
