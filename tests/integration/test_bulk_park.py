"""A push whose bulk payload is still on its way waits aside on the server, never in its event
loop: other workers are served meanwhile, the push is refused (and its connection closed) once
the payload misses its deadline, and the requests its own worker sent behind it keep their
order. First the bulk reader's non-blocking hand-over on a real socket pair, then real servers.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import RemoteError
from paramserver.server.loop import MAX_BEHIND
from paramserver.wire import seal
from paramserver.wire.streams import Reader
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(120)

N = 1 << 18  # float32 values of the dense tables: 1 MiB, the bulk channel's threshold
# a bulk payload's grace (heartbeat_timeout) long enough that the slow push of a test stays
# unfinished for all of the test; its worker's end decides when it ends
SLOW_PEER = dataclasses.replace(FAST, heartbeat_timeout=20.0)


# ---- the reader alone ---------------------------------------------------------------------------


def _wire(payload: bytes, sealing: seal.Seal | None) -> bytes:
    """``payload`` as it travels: raw, or the connection's next sealed records."""
    if sealing is None:
        return payload
    out = bytearray()
    scratch = bytearray(seal.HEAD + seal.RECORD + seal.TAG)
    for at in range(0, len(payload), seal.RECORD):
        out += sealing.seal(memoryview(payload)[at : at + seal.RECORD], scratch)
    return bytes(out)


@pytest.mark.parametrize("sealed", [False, True])
def test_a_reader_hands_a_payload_over_without_blocking_its_caller(sealed: bool) -> None:
    """Part of a payload read ahead: ``take`` takes nothing; ``begin`` returns at once, and
    the reader thread fills the rest (sealed: opens its records into the buffer as they come)
    and wakes its caller once; the next payload, sent right behind, stays read ahead for a
    ``take`` of its own (whole, byte for byte)."""
    if sealed:
        pytest.importorskip("cryptography")
    key = seal.ticket_key(b"k" * 32, 7) if sealed else None
    first = np.random.default_rng(0).integers(0, 256, 3 * seal.RECORD + 5, np.uint8).tobytes()
    second = bytes(range(256)) * 300
    sealing = None if key is None else seal.Seal(key, seal.WORKER_TO_SERVER)
    wire = _wire(first, sealing) + _wire(second, sealing)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader = Reader(ours, "test", None if key is None else seal.Seal(key, seal.WORKER_TO_SERVER))
    reader.start()
    woken = threading.Event()
    try:
        size = reader.wire_size(len(first))
        assert size == len(wire) - reader.wire_size(len(second))
        theirs.sendall(wire[: size // 3])
        # sealed: what is read ahead is the plaintext of the records all in (one of three)
        ahead = size // 3 if key is None else seal.RECORD
        wait_until(lambda: reader.staged == ahead, 10, "the reader to read ahead")
        buf = bytearray(len(first))
        assert not reader.take(memoryview(buf), "first")
        assert reader.staged == ahead  # nothing taken
        reader.begin(memoryview(buf), woken.set)
        assert reader.progress() == (ahead, False, None)
        assert not woken.is_set()
        theirs.sendall(wire[size // 3 :])  # the rest, and the next payload behind it
        assert woken.wait(10)
        assert reader.progress() == (len(first), True, None)
        reader.end()
        assert bytes(buf) == first
        nxt = bytearray(len(second))
        wait_until(
            lambda: reader.take(memoryview(nxt), "second"), 10, "the next payload to be read ahead"
        )
        assert bytes(nxt) == second
    finally:
        reader.close()
        reader.join(5)
        ours.close()
        theirs.close()


def test_a_reader_wakes_its_caller_when_the_connection_breaks_mid_payload() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader = Reader(ours, "test")
    reader.start()
    woken = threading.Event()
    try:
        reader.begin(memoryview(bytearray(1000)), woken.set)
        theirs.sendall(b"x" * 10)
        theirs.close()
        assert woken.wait(10)
        got, full, why = reader.progress()
        assert (got, full) == (10, False)
        assert why is not None and "closed" in why
    finally:
        reader.close()
        reader.join(5)
        ours.close()


# ---- a real server ------------------------------------------------------------------------------


def _ticketed(client: Any) -> socket.socket:
    """A bulk connection to server[0] bound to ``client``'s ZeroMQ identity, as a worker opens
    one, but a plain socket the test writes to as slowly as it likes."""
    reply = client.endpoint.request(
        "server[0]", {"kind": "open_bulk", "rank": client.rank}, what="a bulk ticket"
    ).result(10)
    host = client.view["servers"][0][1].split("//")[1].rsplit(":", 1)[0]
    sock = socket.create_connection((host, reply["port"]), timeout=10)
    sock.sendall(b"PSBULK01" + reply["ticket"].to_bytes(8, "little"))
    assert sock.recv(1) == b"\x01"
    return sock


class Trickle(threading.Thread):
    """Sends a byte every 0.2 s (far below the least rate, never silent) until stopped."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.stopped = threading.Event()
        self.broken: str | None = None

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            try:
                self.sock.send(b"\x00")
            except OSError as exc:
                self.broken = str(exc)
                return

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)


def _push(client: Any, seq: int, what: str, arrays: tuple[Any, ...] = (), **fields: Any) -> Any:
    """A push to dense table ``d`` on server[0] as ``client``'s worker sends one."""
    header = {"kind": "push", "table": "d", "rank": client.rank, "clock": 0, "seq": seq}
    return client.endpoint.request("server[0]", {**header, **fields}, arrays, what=what)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (it sends nothing on it after the acknowledgement)."""
    sock.settimeout(10)
    try:
        while sock.recv(16):
            pass
    except ConnectionError:
        pass
    except TimeoutError:
        return False
    return True


def _answered(client: Any, future: Any) -> bool:
    """Whether the answer to ``client``'s request came (its endpoint takes what arrived)."""
    client.endpoint.poll(0)
    return bool(future.done())


def _bulk_stats(client: Any) -> tuple[int, int]:
    st = client.stats(timeout=30)[0]
    return st.get("bulk_waiting", 0), st.get("bulk_behind", 0)


def test_a_trickling_push_holds_up_no_other_worker() -> None:
    """While a ticketed worker trickles the payload of a 1 MiB push, another worker's pulls
    and pushes (sparse, dense in frames, dense on its own bulk channel) are all answered, with
    NumPy's values, and the slow push is still unfinished (main: the server's loop waited in
    the slow payload's receive, and every other worker with it). The slow worker's own
    requests wait behind its push (past MAX_BEHIND they are refused as ``busy``), and are
    answered once the push is refused."""
    with ps.LocalCluster(servers=1, workers=2, timeouts=SLOW_PEER) as cluster:
        a, b = cluster.connect(transport="tcp"), cluster.connect(transport="zmq")
        sgd = ps.optim.SGD(lr=1.0)
        d = a.dense_table("d", shape=(N,), init=ps.init.Constant(2.0), optimizer=sgd)
        big = a.dense_table("big", shape=(N,), init=ps.init.Constant(2.0), optimizer=sgd)
        small = a.dense_table("small", shape=(64,), init=ps.init.Constant(2.0), optimizer=sgd)
        emb = a.sparse_table("emb", dim=8, init=ps.init.Constant(0.5), optimizer=sgd)
        keys = np.arange(100, dtype=np.uint64)
        before = d.pull().tobytes()
        sock = _ticketed(b)
        trickle = Trickle(sock)
        push = _push(b, 1, "a trickling push", bulk=4 * N)
        trickle.start()
        try:
            # the server holds the push (a server that waits in the receive answers it first)
            wait_until(
                lambda: _bulk_stats(a) == (1, 0) or _answered(b, push),
                30,
                "the server to wait for the payload",
            )
            for i in range(20):
                np.testing.assert_array_equal(emb.pull(keys), np.full((100, 8), 0.5 - i, "f4"))
                emb.push(keys, np.ones((100, 8), np.float32)).result(30)
                np.testing.assert_array_equal(big.pull(), np.full(N, 2.0 - i, np.float32))
                big.push(np.ones(N, np.float32)).result(30)  # on a's own bulk channel
                small.push(np.ones(64, np.float32)).result(30)
            np.testing.assert_array_equal(small.pull(), np.full(64, -18.0, np.float32))
            assert not _answered(b, push)  # all of that while the slow push is unfinished
            assert trickle.is_alive() and trickle.broken is None
            assert _bulk_stats(a) == (1, 0)
            # the slow worker's own requests wait behind its push, up to MAX_BEHIND of them
            pings = [
                b.endpoint.request("server[0]", {"kind": "ping"}, what=f"ping {i}")
                for i in range(MAX_BEHIND + 2)
            ]
            for late in pings[-2:]:
                with pytest.raises(RemoteError, match="wait behind its push") as busy:
                    late.result(30)
                assert busy.value.code == "busy"
            assert _bulk_stats(a) == (1, MAX_BEHIND)
            assert not any(_answered(b, f) for f in pings[:-2])
        finally:
            trickle.stop()
            sock.close()
        # its connection closed mid-payload: refused, the table unchanged; then the requests
        # behind it are answered
        with pytest.raises(RemoteError, match="closed") as err:
            push.result(30)
        assert err.value.code == "bulk"
        for ping in pings[:-2]:
            ping.result(30)
        assert d.pull().tobytes() == before
        assert _bulk_stats(a) == (0, 0)


def test_a_trickling_push_is_refused_at_its_deadline_and_changes_nothing() -> None:
    """Below the least rate after its grace (FAST: 2 s, then 1 s for 1 MiB) the push is
    refused, naming the server, the table, the bytes received of those announced and what
    to do; its connection is closed, the table byte for byte as it was, and the worker's
    next pushes are applied."""
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        a, b = cluster.connect(transport="tcp"), cluster.connect(transport="zmq")
        d = a.dense_table(
            "d", shape=(N,), init=ps.init.Constant(2.0), optimizer=ps.optim.SGD(lr=1.0)
        )
        before = d.pull().tobytes()
        sock = _ticketed(b)
        trickle = Trickle(sock)
        push = _push(b, 1, "a trickling push", bulk=4 * N)
        trickle.start()
        try:
            with pytest.raises(RemoteError) as err:
                push.result(30)
            assert _closed_by_peer(sock)
        finally:
            trickle.stop()
            sock.close()
        message = str(err.value)
        assert err.value.code == "bulk"
        for part in ("server[0]", "table 'd'", f"of {4 * N} bytes", "least rate", "push again"):
            assert part in message, (part, message)
        assert "the table is unchanged" in message
        assert d.pull().tobytes() == before
        _push(b, 2, "the push sent again, in frames", (np.ones(N, np.float32),)).result(30)
        np.testing.assert_array_equal(d.pull(), np.full(N, 1.0, np.float32))


def test_requests_behind_a_waiting_push_keep_their_worker_s_order() -> None:
    """A worker's pull, push and pull sent while its bulk push's payload is half there wait
    behind that push, and are answered in the order sent once the rest comes: the first pull
    sees the bulk push (read-your-writes), the second both pushes."""
    with ps.LocalCluster(servers=1, workers=2, timeouts=SLOW_PEER) as cluster:
        a, b = cluster.connect(transport="tcp"), cluster.connect(transport="zmq")
        d = a.dense_table(
            "d", shape=(N,), init=ps.init.Constant(2.0), optimizer=ps.optim.SGD(lr=1.0)
        )
        g1, g2 = np.ones(N, np.float32), np.full(N, 0.25, np.float32)
        raw = g1.view(np.uint8)
        sock = _ticketed(b)
        try:
            push1 = _push(b, 1, "the bulk push", bulk=raw.nbytes)
            sock.sendall(raw[: raw.nbytes // 2])
            wait_until(lambda: _bulk_stats(a) == (1, 0), 30, "the server to wait for the rest")
            pull = {"kind": "pull", "table": "d", "rank": b.rank, "clock": 0}
            pull |= {"create": False, "timeout": 30.0}

            def values(msg: Any) -> np.ndarray:
                return np.array(msg[1][0], copy=True)

            pull1 = b.endpoint.request("server[0]", pull, what="pull 1", parse=values)
            push2 = _push(b, 2, "push 2", (g2,))
            pull2 = b.endpoint.request("server[0]", pull, what="pull 2", parse=values)
            wait_until(lambda: _bulk_stats(a) == (1, 3), 30, "b's requests to wait behind")
            assert not any(_answered(b, f) for f in (push1, pull1, push2, pull2))
            sock.sendall(raw[raw.nbytes // 2 :])
            push1.result(30)
            np.testing.assert_array_equal(pull1.result(30), 2.0 - g1)
            push2.result(30)
            np.testing.assert_array_equal(pull2.result(30), 2.0 - g1 - g2)
        finally:
            sock.close()
        assert _bulk_stats(a) == (0, 0)
        np.testing.assert_array_equal(d.pull(), 2.0 - g1 - g2)


class SpoilRecord(seal.Seal):
    """A real sealing of records, one of which (number ``spoilt``) has a bit flipped."""

    spoilt = -1

    def seal(self, plain: memoryview, out: bytearray) -> memoryview:
        record = super().seal(plain, out)
        if self.count == self.spoilt:
            record[100] ^= 0x01
        return record


def test_a_sealed_payload_that_came_after_its_header_is_opened_or_refused() -> None:
    """With a cluster token, a 24 MiB push (above PRESEND_MAX, so its payload follows its
    header and is read while the push waits aside) is applied as NumPy says; one with a
    record spoilt on the way is refused as it is opened, the table unchanged, and the next
    push goes through on a new channel."""
    pytest.importorskip("cryptography")
    n = 6 << 20  # float32: 24 MiB
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST, token="x" * 32) as cluster:
        client = cluster.connect(transport="tcp")
        w = client.dense_table(
            "w", shape=(n,), init=ps.init.Constant(2.0), optimizer=ps.optim.SGD(lr=1.0)
        )
        w.push(np.ones(n, np.float32)).result(30)
        np.testing.assert_array_equal(w.pull(), np.full(n, 1.0, np.float32))
        channel = client.endpoint.peers["server[0]"].bulk
        assert channel is not None and channel.sealed
        sealing = channel.writer.seal
        assert sealing is not None
        SpoilRecord.spoilt = sealing.count + 5  # the fifth record of the next push
        sealing.__class__ = SpoilRecord
        with pytest.raises(RemoteError, match="failed authentication") as err:
            w.push(np.ones(n, np.float32)).result(30)
        assert err.value.code == "bulk"
        np.testing.assert_array_equal(w.pull(), np.full(n, 1.0, np.float32))
        w.push(np.full(n, 0.5, np.float32)).result(30)
        np.testing.assert_array_equal(w.pull(), np.full(n, 0.5, np.float32))
