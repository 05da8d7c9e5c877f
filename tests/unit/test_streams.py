"""A bulk connection's two threads over a real socket pair: payloads arrive whole and in order
whether they go out from the caller's thread (nothing queued ahead), in part from it and the
rest from the writer thread (larger than the socket takes at once), or behind others; and
whether the reader waits for them or they were read ahead (into pieces that are then reused)."""

from __future__ import annotations

import socket

import numpy as np

from paramserver.wire.streams import Reader, Writer


def pair() -> tuple[socket.socket, socket.socket, Reader, Writer]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    reader, writer = Reader(b, "test"), Writer(a, "test", idle=10.0)
    reader.start()
    writer.start()
    return a, b, reader, writer


def close(a: socket.socket, b: socket.socket, reader: Reader, writer: Writer) -> None:
    writer.close()
    reader.close()
    a.close()
    b.close()
    writer.join(5)
    reader.join(5)


def payloads(sizes: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(sum(sizes))
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


def test_payloads_arrive_whole_and_in_order_however_they_went_out() -> None:
    a, b, reader, writer = pair()
    try:
        # small ones (direct), one far larger than the socket takes at once (direct in part,
        # the rest queued), and ones queued behind it
        sent = payloads([10, 3 << 20, 12 << 20, 5000, 1 << 20, 7])
        for p in sent:
            writer.send(memoryview(p), "payload")
        for p in sent:
            got = np.empty_like(p)
            reader.read_into(memoryview(got), 10.0, "payload")
            assert np.array_equal(got, p)
        writer.flush(10.0, "payloads")
    finally:
        close(a, b, reader, writer)


def test_payloads_read_ahead_come_back_intact_through_reused_pieces() -> None:
    a, b, reader, writer = pair()
    try:
        for _ in range(3):  # later rounds read ahead into the pieces the earlier ones freed
            sent = payloads([(3 << 20) // 2, 1 << 20, 3, (5 << 20) // 2])
            for p in sent:
                writer.send(memoryview(p), "payload")
            writer.flush(10.0, "payloads")
            total = sum(p.nbytes for p in sent)
            with reader.cond:  # all of it read ahead before anyone asks
                while reader.staged < total and reader.error is None:
                    reader.cond.wait(1.0)
            for p in sent:
                got = np.empty_like(p)
                reader.read_into(memoryview(got), 10.0, "payload")
                assert np.array_equal(got, p)
    finally:
        close(a, b, reader, writer)


def test_a_released_payload_still_goes_out_as_it_was_when_queued() -> None:
    a, b, reader, writer = pair()
    try:
        big, after = payloads([16 << 20, 1 << 20])
        want = big.copy(), after.copy()
        owner = object()
        writer.send(memoryview(big), "big")
        writer.send(memoryview(after), "after", owner)
        writer.release(owner)  # its memory is reused now: what is still queued was copied
        after[:] = 0
        for p in want:
            got = np.empty_like(p)
            reader.read_into(memoryview(got), 10.0, "payload")
            assert np.array_equal(got, p)
    finally:
        close(a, b, reader, writer)


def test_an_expected_payload_lands_in_its_buffer_and_what_follows_it_comes_next() -> None:
    a, b, reader, writer = pair()
    try:
        # the buffer is larger than the payload (its header names fewer bytes): the bytes read
        # into it beyond the payload belong to the next one and come back in order
        first, second, third = payloads([(3 << 20) // 2 + 5, 700_000, 33])
        sink = np.zeros(first.nbytes + 300_000, np.uint8)
        assert reader.expect(memoryview(sink))
        assert not reader.expect(memoryview(np.empty(10, np.uint8)))  # one at a time
        for p in (first, second, third):
            writer.send(memoryview(p), "payload")
        writer.flush(10.0, "payloads")
        reader.settle(first.nbytes, 10.0, "first")
        assert np.array_equal(sink[: first.nbytes], first)
        for p in (second, third):
            got = np.empty_like(p)
            reader.read_into(memoryview(got), 10.0, "payload")
            assert np.array_equal(got, p)
        # an answer without a payload: whatever reached the buffer is the next payload's
        sink[:] = 0
        assert reader.expect(memoryview(sink))
        (fourth,) = payloads([200_001])
        writer.send(memoryview(fourth), "payload")
        writer.flush(10.0, "payload")
        reader.settle(0, 10.0, "no payload")
        got = np.empty_like(fourth)
        reader.read_into(memoryview(got), 10.0, "payload")
        assert np.array_equal(got, fourth)
        # bytes read ahead come first: nothing is expected over them
        writer.send(memoryview(fourth), "payload")
        writer.flush(10.0, "payload")
        with reader.cond:
            assert reader.cond.wait_for(lambda: reader.staged == fourth.nbytes, 10.0)
        assert not reader.expect(memoryview(sink))
        got[:] = 0
        assert reader.take(memoryview(got), "payload")
        assert np.array_equal(got, fourth)
    finally:
        close(a, b, reader, writer)


def test_settle_names_the_payload_when_the_connection_breaks() -> None:
    a, b, reader, writer = pair()
    try:
        sink = np.zeros(1000, np.uint8)
        assert reader.expect(memoryview(sink))
        a.sendall(b"x" * 10)
        a.shutdown(socket.SHUT_RDWR)
        try:
            reader.settle(1000, 10.0, "pull of 'w'")
        except ConnectionError as exc:
            assert "pull of 'w'" in str(exc) and "of 1000 bytes" in str(exc)
        else:
            raise AssertionError("settle returned without the payload")
        assert reader.target is None  # the buffer was taken back
    finally:
        close(a, b, reader, writer)
