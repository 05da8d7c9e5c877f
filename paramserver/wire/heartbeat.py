"""Heartbeats on their own thread and socket, so a long computation or a long kernel never
looks like death.

:class:`Pulse` is the transport's part: it sends the beat its owner builds every ``interval``
seconds and hands every answer to its owner. What a beat says and what an answer means (a
member's role, rank and incarnation; being expelled; a newer view) belongs to the owner: the
worker's session, the server, and on the other end the coordinator's membership.

Liveness does not hang on this thread alone: the coordinator's ROUTER also pings the beat's
connection (ZMTP heartbeats, see :class:`paramserver.wire.router.Router`), and libzmq's I/O
thread answers those pings without the GIL, so a member whose Python code holds the GIL for
minutes stays connected while a stopped process does not.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from paramserver.errors import ProtocolError
from paramserver.wire import protocol
from paramserver.wire.messages import VIEW_NUMBER
from paramserver.wire.security import Security
from paramserver.wire.sockets import recv_frames, send_frames

__all__ = ["MissedViews", "Pulse"]

SENT_KEPT = 4096  # beats whose send time is remembered (minutes of beats at any interval used)

log = logging.getLogger(__name__)


class Pulse(threading.Thread):
    """Sends ``beat()`` (a header; its ``id`` is added) to ``coordinator`` every ``interval``
    seconds on a socket of its own, and calls ``on_answer(header)`` with every answer, from
    this thread. :attr:`last_answer` is when the newest beat that has been answered was sent
    (``time.monotonic()``): an answer that was held up (a link cut, then back: TCP resends what
    the coordinator said before it declared this member dead) says only that the coordinator
    held this member alive when that beat went out, so it must not count as fresh news. An
    answer to no beat of this thread's recent ones (another id) refreshes nothing.

    A beat that cannot go out at once is skipped, never queued: the next one says the same.

    Example:
        pulse = Pulse(ctx, "tcp://10.0.0.1:7070", lambda: {"kind": "heartbeat", ...}, 0.5)
        pulse.start(); ...; pulse.stop(); pulse.join(2)
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        coordinator: str,
        beat: Callable[[], dict[str, Any]],
        interval: float,
        *,
        on_answer: Callable[[dict[str, Any]], None] | None = None,
        security: Security | None = None,
        name: str = "heartbeat",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.ctx = ctx
        self.coordinator = coordinator
        self.beat = beat
        self.interval = interval
        self.on_answer = on_answer
        self.security = security
        self.last_answer = time.monotonic()
        self._sent: dict[int, float] = {}  # beat id -> when it went out (the newest SENT_KEPT)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 0)  # never block: a beat that cannot go out is skipped
        if self.security is not None:
            self.security.client(sock)
        sock.connect(self.coordinator)
        try:
            n = 0
            while not self._stop_event.is_set():
                n += 1
                with contextlib.suppress(zmq.Again):
                    send_frames(sock, protocol.encode({**self.beat(), "id": n}))
                    self._sent[n] = time.monotonic()
                    self._sent.pop(n - SENT_KEPT, None)
                deadline = time.monotonic() + self.interval
                while (left := deadline - time.monotonic()) > 0 and not self._stop_event.is_set():
                    # short slices, so that stop() is noticed within ~50 ms
                    if sock.poll(min(50, int(left * 1000) + 1), zmq.POLLIN):
                        self._handle(recv_frames(sock))
        except zmq.ZMQError as exc:  # context terminated while we were running
            if exc.errno != zmq.ETERM:
                log.warning("%s stopped: %s", self.name, exc)
        finally:
            sock.close(0)

    def _handle(self, frames: list[Any]) -> None:
        try:
            header, _ = protocol.decode(frames)
        except ProtocolError:
            return
        rid = header.get("id")
        sent = self._sent.pop(rid, None) if isinstance(rid, int) else None
        # what the answer says first, then that it came: the owner's thread that sees a fresh
        # answer must also see what it said (a refused beat: expelled, rejoin before a request)
        if self.on_answer is not None:
            self.on_answer(header)
        if sent is not None:
            self.last_answer = max(self.last_answer, sent)


class MissedViews:
    """The views a member missed: a coordinator restarted from its journal sends views before
    the member's connection to it is back, and those are lost. Every heartbeat's answer names
    the coordinator's view number (:meth:`heard`, on the heartbeat thread); the owner's own
    thread asks for the view once its own is older (:meth:`catch_up`).

    Example:
        missed.heard(answer["view"])                       # Pulse's on_answer
        missed.catch_up(my_view_number, ask_get_view, apply_view)   # on the owner's turn
    """

    def __init__(self) -> None:
        self.newest = 0  # the coordinator's view number in the newest heartbeat answer
        self.asked: Any = None  # the get_view in flight (a transport Future)

    def heard(self, view: dict[str, Any]) -> None:
        number = view.get(VIEW_NUMBER)
        if isinstance(number, int):
            self.newest = number

    def catch_up(
        self, have: int, ask: Callable[[], Any], take: Callable[[dict[str, Any]], None]
    ) -> None:
        """Ask (``ask()``: a future of a ``get_view`` answer) when view ``have`` is older than
        the coordinator's; hand the answer's view to ``take`` once it came."""
        asked = self.asked
        if asked is not None:
            if not asked.done():
                return
            self.asked = None
            if asked.exception(0) is None:
                take(asked.result(0)["view"])
        elif self.newest > have:
            self.asked = ask()
