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
