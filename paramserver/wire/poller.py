"""A server's wait for work: its ROUTER socket and the bulk channel's sockets in one poll.

The bulk channel (:mod:`paramserver.wire.bulk`) is plain TCP; its listening socket, its
handshakes and its connections with pending writes are watched in the same ``zmq.Poller`` as
the ROUTER, and their events go straight to the :class:`~paramserver.wire.bulk.Listener`.
"""

from __future__ import annotations

import zmq

from paramserver.wire import bulk
from paramserver.wire.transport import Router

__all__ = ["Poller"]


class Poller:
    """Poll a server's ROUTER (and its bulk channel, if it has one).

    Example:
        poller = Poller(router, listener)
        if poller.poll(100):
            ...  # read the ROUTER until it is empty
    """

    def __init__(self, router: Router, channel: bulk.Listener | None) -> None:
        self.channel = channel
        self.poller = zmq.Poller()
        self.poller.register(router.socket, zmq.POLLIN)
        self.watched: dict[int, int] = {}  # bulk fds in the poller -> events

    def poll(self, wait_ms: int) -> bool:
        """Wait up to ``wait_ms`` for an event; handle the bulk channel's. True if anything
        happened (the ROUTER may have messages)."""
        if self.channel is None:
            return bool(self.poller.poll(wait_ms))
        reading, writing = self.channel.fds()
        want: dict[int, int] = dict.fromkeys(reading, int(zmq.POLLIN))
        for fd in writing:
            want[fd] = want.get(fd, 0) | int(zmq.POLLOUT)
        for fd in self.watched.keys() - want.keys():
            self.poller.unregister(fd)
        for fd, ev in want.items():
            if self.watched.get(fd) != ev:
                self.poller.register(fd, ev)
        self.watched = want
        events = self.poller.poll(wait_ms)
        for sock, ev in events:
            if isinstance(sock, int):
                err = bool(ev & zmq.POLLERR)
                self.channel.handle(
                    sock, err or bool(ev & zmq.POLLIN), err or bool(ev & zmq.POLLOUT)
                )
        return bool(events)
