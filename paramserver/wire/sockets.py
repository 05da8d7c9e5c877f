"""ZeroMQ contexts, frames in and out, and the listening socket a launcher hands over.

* :func:`new_context`: one context per process role, never the global instance.
* :func:`recv_frames` and :func:`send_frames`: a multipart message without copies.
* :func:`listen_for_handover`: a TCP socket bound and listening in one process, for another
  process to take over (``ZMQ_USE_FD``), so that peers may connect before that process runs.
"""

from __future__ import annotations

import socket as pysocket
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

__all__ = [
    "SEND_TIMEOUT_MS",
    "Message",
    "listen_for_handover",
    "new_context",
    "recv_frames",
    "send_frames",
]

# A decoded message: its header and its arrays.
Message = tuple[dict[str, Any], list[np.ndarray]]

# A DEALER whose peer is unreachable (e.g. its CURVE handshake failed) has no pipe to queue a
# message on, and a plain send would then block forever: every send gives up after this long.
SEND_TIMEOUT_MS = 2000


def new_context() -> zmq.Context[Any]:
    """A fresh ZeroMQ context (one per process role; never the global instance)."""
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx


def recv_frames(socket: zmq.Socket[Any]) -> list[Any]:
    """One multipart message, as buffers over libzmq's frames (no copy)."""
    return [f.buffer for f in socket.recv_multipart(copy=False)]


def send_frames(
    socket: zmq.Socket[Any],
    frames: Sequence[Any],
    prefix: Sequence[bytes] = (),
    track: bool = False,
) -> Any:
    """Send ``prefix`` + ``frames`` as one message without copying; with ``track``, a tracker."""
    return socket.send_multipart([*prefix, *frames], copy=False, track=track)


def listen_for_handover(host: str, port: int) -> pysocket.socket | None:
    """A TCP socket bound at ``host:port`` (0: any free port), listening and inheritable, for a
    child process to take over as its ROUTER's socket (``Router(listen_fd=...)``); None where
    libzmq cannot take one over (then the child binds by itself).

    Example:
        sock = listen_for_handover("127.0.0.1", 0)   # port: sock.getsockname()[1]
    """
    if not hasattr(zmq, "USE_FD") or host in ("0.0.0.0", "*"):
        return None
    try:
        family = pysocket.AF_INET6 if ":" in host else pysocket.AF_INET
        sock = pysocket.socket(family, pysocket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(256)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the coordinator at {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock
