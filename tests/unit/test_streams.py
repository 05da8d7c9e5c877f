"""A bulk connection's two threads over a real socket pair: payloads arrive whole and in order
whether they go out from the caller's thread (nothing queued ahead), in part from it and the
rest from the writer thread (larger than the socket takes at once), or behind others; and
whether the reader waits for them or they were read ahead (into pieces that are then reused);
raw, and sealed with a cluster token's key (records opened by the reader thread as they come,
one that fails authentication refused)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from paramserver.wire import seal
from paramserver.wire.streams import Reader, Writer

SEALED = [False, pytest.param(True, marks=pytest.mark.skipif(not seal.available(), reason="no cryptography"))]  # fmt: skip


def pair(sealed: bool = False) -> tuple[socket.socket, socket.socket, Reader, Writer]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    key = seal.ticket_key(b"k" * 32, 3)

    def sealing() -> seal.Seal | None:
        return seal.Seal(key, seal.WORKER_TO_SERVER) if sealed else None

    reader, writer = Reader(b, "test", sealing()), Writer(a, "test", 10.0, sealing())
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


@pytest.mark.parametrize("sealed", SEALED)
def test_payloads_arrive_whole_and_in_order_however_they_went_out(sealed: bool) -> None:
    a, b, reader, writer = pair(sealed)
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


@pytest.mark.parametrize("sealed", SEALED)
def test_payloads_read_ahead_come_back_intact_through_reused_pieces(sealed: bool) -> None:
    a, b, reader, writer = pair(sealed)
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


@pytest.mark.parametrize("sealed", SEALED)
def test_a_released_payload_still_goes_out_as_it_was_when_queued(sealed: bool) -> None:
    a, b, reader, writer = pair(sealed)
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


@pytest.mark.parametrize("sealed", SEALED)
def test_an_expected_payload_lands_in_its_buffer_and_what_follows_it_comes_next(
    sealed: bool,
) -> None:
    a, b, reader, writer = pair(sealed)
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


@pytest.mark.parametrize("sealed", SEALED)
def test_settle_names_the_payload_when_the_connection_breaks(sealed: bool) -> None:
    a, b, reader, writer = pair(sealed)
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


class SpoilSecond(seal.Seal):
    """A real sealing whose record number 2 has a bit of its ciphertext flipped on the way."""

    def seal(self, plain: memoryview, out: bytearray | memoryview) -> memoryview:
        record = super().seal(plain, out)
        if self.count == 3:  # (counted already: this was record 2)
            record[seal.HEAD + 7] ^= 0x10
        return record


@pytest.mark.skipif(not seal.available(), reason="no cryptography")
def test_a_sealed_record_that_fails_authentication_is_never_handed_out() -> None:
    """The payload before it comes whole; the one it belongs to is refused (its reader says
    which record failed), whether it was read ahead or waited for; the rest of the stream is
    drained, so its sender's writes end."""
    a, b, reader, writer = pair(sealed=True)
    try:
        assert writer.seal is not None
        writer.seal.__class__ = SpoilSecond
        good, spoilt, after = payloads([seal.RECORD, 2 * seal.RECORD, 3 << 20])
        for p in (good, spoilt, after):
            writer.send(memoryview(p), "payload")
        writer.flush(10.0, "payloads")  # the reader drains what follows the failed record
        with reader.cond:  # (the failure is kept once the record before it is read ahead)
            assert reader.cond.wait_for(lambda: reader.error is not None, 10.0)
        got = np.empty_like(good)
        reader.read_into(memoryview(got), 10.0, "good")
        assert np.array_equal(got, good)
        got = np.zeros_like(spoilt)
        assert reader.staged == seal.RECORD  # its first record alone was opened
        assert not reader.take(memoryview(got), "spoilt")
        with pytest.raises(ConnectionError, match="spoilt: record 2 failed authentication"):
            reader.read_into(memoryview(got), 10.0, "spoilt")
        assert not got[seal.RECORD :].any()  # nothing of the failed record was handed out
    finally:
        close(a, b, reader, writer)


@pytest.mark.skipif(not seal.available(), reason="no cryptography")
def test_a_sealed_stream_out_of_step_is_refused_by_its_length_field() -> None:
    a, b, reader, writer = pair(sealed=True)
    try:
        a.sendall((seal.RECORD + 1).to_bytes(seal.HEAD, "little") + bytes(100))
        with pytest.raises(ConnectionError, match="record 0 claims 262145 bytes"):
            reader.read_into(memoryview(bytearray(10)), 10.0, "payload")
    finally:
        close(a, b, reader, writer)
