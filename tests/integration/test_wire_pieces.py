"""The transport's pieces on real sockets, without a cluster: a pulse beats what its owner
builds and hands answers back, and counts only answers to recent beats as news; a socket bound and listening in one place is taken over by a
ROUTER built later, and a peer that connected in between is answered."""

from __future__ import annotations

import threading
import time

import pytest

from paramserver.wire import protocol
from paramserver.wire.sockets import listen_for_handover
from paramserver.wire.transport import Endpoint, Pulse, Router, new_context

pytestmark = pytest.mark.timeout(60)


def test_a_pulse_sends_its_owners_beat_and_hands_every_answer_back() -> None:
    ctx = new_context()
    router = Router(ctx, "127.0.0.1")
    answers: list[dict[str, object]] = []
    got = threading.Event()
    clock = [0]

    def on_answer(header: dict[str, object]) -> None:
        answers.append(header)
        got.set()

    def beat() -> dict[str, object]:
        return {"kind": "heartbeat", "role": "worker", "rank": 3, "token": 7, "clock": clock[0]}

    pulse = Pulse(ctx, router.address, beat, 0.05, on_answer=on_answer)
    pulse.start()
    try:
        seen = []
        for n in range(3):
            clock[0] = n + 10
            identity, frames = router.recv_raw()
            header, _ = protocol.decode(frames)
            seen.append(header)
        assert [(h["kind"], h["rank"], h["token"]) for h in seen] == [("heartbeat", 3, 7)] * 3
        assert [h["id"] for h in seen] == [1, 2, 3]  # the pulse numbers its beats
        assert seen[-1]["clock"] in (11, 12)  # built at each beat, not once
        router.error(identity, seen[-1]["id"], "expelled", "not a member")
        assert got.wait(10), "no answer reached the pulse's owner"
        assert answers[0]["kind"] == "error" and answers[0]["message"] == "not a member"
    finally:
        pulse.stop()
        pulse.join(5)
        router.close()
        ctx.term()
    assert not pulse.is_alive()


def test_a_held_up_answer_to_an_old_beat_is_not_fresh_news() -> None:
    """A member cut off and reconnected gets the coordinator's answers to beats sent before
    the cut (TCP resends them). Such an answer must not make the coordinator look recently
    heard from: a server fenced by silence would otherwise serve again on a stale 'ok'."""
    ctx = new_context()
    router = Router(ctx, "127.0.0.1")
    answered = threading.Event()
    beat = {"kind": "heartbeat", "role": "worker", "rank": 0, "token": 1, "clock": 0}
    pulse = Pulse(ctx, router.address, lambda: beat, 0.02,
                  on_answer=lambda h: answered.set())  # fmt: skip
    pulse.start()
    try:
        identity, frames = router.recv_raw()
        first, _ = protocol.decode(frames)
        sent_first = time.monotonic()  # the first beat went out before this
        for _ in range(20):  # beats go on unanswered (a cut link), ~0.4 s of them
            router.recv_raw()
        held_until = time.monotonic()
        router.reply(identity, first["id"])  # the old beat's answer, come late
        assert answered.wait(10), "the late answer did not reach the pulse"
        assert pulse.last_answer <= sent_first < held_until - 0.3
        answered.clear()
        _, frames = router.recv_raw()
        newest, _ = protocol.decode(frames)
        router.reply(identity, newest["id"])  # an answer to a beat just sent: fresh
        assert answered.wait(10), "the answer to the newest beat did not reach the pulse"
        assert pulse.last_answer >= held_until
        answered.clear()
        router.reply(identity, 0)  # an answer to no beat of the pulse's
        assert answered.wait(10)
        assert pulse.last_answer < time.monotonic()
    finally:
        pulse.stop()
        pulse.join(5)
        router.close()
        ctx.term()


def test_a_handed_over_socket_answers_a_peer_that_connected_before_the_router_existed() -> None:
    listener = listen_for_handover("127.0.0.1", 0)
    if listener is None:
        pytest.skip("this libzmq cannot take over a socket (no ZMQ_USE_FD)")
    port = listener.getsockname()[1]
    ctx = new_context()
    ep = Endpoint(ctx, request_timeout=10.0)
    router = None
    try:
        ep.connect("coordinator", f"tcp://127.0.0.1:{port}")
        fut = ep.request("coordinator", {"kind": "ping"}, what="ping before the router exists")
        ep.poll(0.1)
        assert not fut.done()
        router = Router(ctx, "127.0.0.1", port, listen_fd=listener.fileno())
        listener.detach()  # the ROUTER owns the descriptor now, and closes it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ep.poll(0.01)
            try:
                identity, frames = router.recv_raw_nowait()
            except BlockingIOError:
                continue
            header, _ = protocol.decode(frames)
            router.reply(identity, header["id"], port=port)
            break
        assert fut.result(10)["port"] == port
    finally:
        ep.close()
        if router is not None:
            router.close()
        listener.close()
        ctx.term()
