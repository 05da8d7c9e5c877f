"""A worker's ring during a move (client/ring.py): the new ring from its step's end, and the
old ring (and the dense tables' old placement) back when the coordinator abandons the move."""

from __future__ import annotations

from typing import Any

from paramserver.client.ring import RingRouting
from paramserver.wire.future import Future


class Routing(RingRouting):
    """RingRouting with the session's request_server answered at once (what it sent kept)."""

    def __init__(self) -> None:
        self.rank, self._clock, self._clock_futures = 0, 3, []
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.dense_moved = {"bias": [(0, 0, 8)]}
        self.build_ring(2)

    def request_server(self, s: int, header: dict[str, Any], *, what: str) -> Future[Any]:
        self.sent.append((s, header))
        fut: Future[Any] = Future(None, what)
        fut.set_result({})
        return fut

    def move_dense(self, ranges: dict[str, list[tuple[int, int, int]]]) -> None:
        self.dense_moved = {**self.dense_moved, **ranges}


DRAIN = {"epoch": 5, "ring": [0, 1], "servers": [],
         "move": {"id": 1, "from": [0, 1], "to": [1], "view": 5, "kind": "drain", "rank": 0,
                  "dense": {"bias": [[1, 0, 8]]}}}  # fmt: skip
ABANDONED = {"epoch": 6, "ring": [0, 1], "servers": []}
DONE = {"epoch": 6, "ring": [1], "servers": []}


def test_a_switched_worker_goes_back_to_the_old_ring_and_placement_when_the_move_is_abandoned() -> (
    None
):
    r = Routing()
    r.take_ring(DRAIN)
    r.switch_ring()  # its step's end
    assert r.ring_servers == [1] and r.dense_moved["bias"] == [(1, 0, 8)]
    assert sorted(s for s, h in r.sent if h["kind"] == "switched") == [0, 1]
    r.take_ring(ABANDONED)
    assert r.ring_servers == [0, 1] and r.servers == [0, 1]
    assert r.dense_moved["bias"] == [(0, 0, 8)]


def test_a_worker_that_had_not_switched_never_takes_an_abandoned_ring() -> None:
    r = Routing()
    r.take_ring(DRAIN)
    r.take_ring(ABANDONED)
    r.switch_ring()  # its step's end: nothing waits any more
    assert r.ring_servers == [0, 1] and r.sent == []
    assert r.dense_moved["bias"] == [(0, 0, 8)]


def test_a_move_done_keeps_the_new_ring_and_placement() -> None:
    r = Routing()
    r.take_ring(DRAIN)
    r.switch_ring()
    r.take_ring(DONE)
    assert r.ring_servers == [1] and r.dense_moved["bias"] == [(1, 0, 8)]
