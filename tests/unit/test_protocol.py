"""Frame encoding round trips and validation of every header field."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver.errors import ProtocolError
from paramserver.wire import protocol


def roundtrip(header: dict, arrays=()):  # type: ignore[no-untyped-def]
    frames = protocol.encode(header, arrays)
    return protocol.decode([bytes(f) for f in frames])


def test_arrays_round_trip_with_dtype_and_shape() -> None:
    keys = np.array([0, 7, 2**64 - 1], dtype=np.uint64)
    vals = np.arange(12, dtype=np.float32).reshape(3, 4)
    h, (k, v) = roundtrip(
        {"kind": "push", "id": 5, "table": "t", "rank": 0, "clock": 1, "seq": 9}, [keys, vals]
    )
    assert h["kind"] == "push" and h["id"] == 5 and "arrays" not in h
    np.testing.assert_array_equal(k, keys)
    np.testing.assert_array_equal(v, vals)
    assert v.dtype == np.float32 and v.shape == (3, 4)


def test_large_arrays_travel_in_1mib_frames_without_copies() -> None:
    big = np.random.default_rng(0).standard_normal(700_000)  # 5.3 MiB
    frames = protocol.encode(
        {"kind": "push", "id": 1, "table": "t", "rank": 0, "clock": 0, "seq": 1}, [big]
    )
    assert len(frames) == 1 + 6
    assert all(isinstance(f, memoryview) for f in frames[1:])
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), big)
    _, (back,) = protocol.decode(frames)
    np.testing.assert_array_equal(back, big)


def test_empty_and_non_contiguous_arrays() -> None:
    a = np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2]
    _, (e, b) = roundtrip({"kind": "reply", "id": 1}, [np.empty((0, 3), np.float32), a])
    assert e.shape == (0, 3)
    np.testing.assert_array_equal(b, a)


def test_unsupported_dtype_is_refused_on_send() -> None:
    with pytest.raises(ProtocolError, match="complex128"):
        protocol.encode({"kind": "reply", "id": 1}, [np.zeros(2, np.complex128)])


def packed(header: dict) -> bytes:
    return msgpack.packb({"v": protocol.VERSION, **header})


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"kind": "launch", "id": 1}, "unknown message kind 'launch'"),
        ({"kind": "ping", "id": -1}, "field 'id'"),
        ({"kind": "ping", "id": 1, "extra": 1}, "unexpected field 'extra'"),
        (
            {"kind": "pull", "id": 1, "table": "t", "rank": 0, "clock": 0, "create": True},
            "missing field 'timeout'",
        ),
        (
            {
                "kind": "pull",
                "id": 1,
                "table": "t",
                "rank": 0,
                "clock": 0,
                "create": 1,
                "timeout": 1,
            },
            "field 'create'",
        ),
        (
            {
                "kind": "pull",
                "id": 1,
                "table": "",
                "rank": 0,
                "clock": 0,
                "create": True,
                "timeout": 1,
            },
            "field 'table'",
        ),
        ({"kind": "clock", "id": 1, "rank": 0, "clock": 2**63}, "field 'clock'"),
        ({"kind": "push", "id": 1, "table": "t", "rank": 0, "clock": 0, "seq": 1.5}, "field 'seq'"),
        ({"kind": "set_lr", "id": 1, "table": "t", "lr": float("nan")}, "field 'lr'"),
    ],
)
def test_invalid_headers_name_the_field(header: dict, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protocol.decode([packed(header)])


def test_version_and_layout_checks() -> None:
    with pytest.raises(ProtocolError, match="version"):
        protocol.decode([msgpack.packb({"v": 99, "kind": "ping", "id": 1})])
    ok = packed({"kind": "reply", "id": 1, "arrays": [["float32", [2], 1]]})
    with pytest.raises(ProtocolError, match=r"3 bytes received.*needs 8"):
        protocol.decode([ok, b"abc"])
    with pytest.raises(ProtocolError, match="more frames"):
        protocol.decode([ok])
    with pytest.raises(ProtocolError, match="frames more"):
        protocol.decode([ok, b"\0" * 8, b"x"])
    bad_dtype = packed({"kind": "reply", "id": 1, "arrays": [["object", [1], 1]]})
    with pytest.raises(ProtocolError, match="unsupported dtype"):
        protocol.decode([bad_dtype, b"\0" * 8])
    huge = packed({"kind": "reply", "id": 1, "arrays": [["float64", [2**39, 2**39], 1]]})
    with pytest.raises(ProtocolError):
        protocol.decode([huge, b""])
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        protocol.decode([b"\xc1"])
    with pytest.raises(ProtocolError, match="must be a map"):
        protocol.decode([msgpack.packb([1, 2])])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_decode_of_random_bytes_only_raises_protocol_error(frames: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode(frames)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_of_mutated_messages_only_raises_protocol_error(data: st.DataObject) -> None:
    frames = [
        bytearray(f)
        for f in protocol.encode(
            {"kind": "push", "id": 3, "table": "emb", "rank": 1, "clock": 2, "seq": 4},
            [np.arange(4, dtype=np.uint64), np.ones((4, 2), np.float32)],
        )
    ]
    i = data.draw(st.integers(0, len(frames) - 1))
    if frames[i]:
        pos = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i][pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        frames = frames[: data.draw(st.integers(1, len(frames)))]
    try:
        header, _ = protocol.decode([bytes(f) for f in frames])
    except ProtocolError:
        return
    assert header["kind"] in protocol.KINDS


def test_slot_end_is_where_encode_stops_placing_arrays() -> None:
    """A worker puts a reply after slot_end(arrays): it must not overlap what encode placed."""
    region = np.zeros(1 << 22, np.uint8)
    arrays = [
        np.arange(5000, dtype=np.uint64),  # 40 000 bytes: in the slot
        np.ones(10, np.float32),  # small: a frame
        np.ones((3001, 3), np.float32),  # 36 012 bytes: in the slot, after the first
    ]
    frames = protocol.encode({"kind": "ping", "id": 7}, arrays, region)
    layout = msgpack.unpackb(frames[0])["arrays"]
    placed = [(e[3], a.nbytes) for e, a in zip(layout, arrays, strict=True) if len(e) == 4]
    assert len(placed) == 2 and len(frames) == 2  # header + the small array's frame
    end = max(off + n for off, n in placed)
    assert end <= protocol.slot_end(arrays) < end + protocol.SLOT_ALIGN
    header = protocol.decode_header(frames[0])
    got = protocol.decode_arrays(header, frames, region=region)
    for a, b in zip(arrays, got, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ProtocolError, match="no such slot") as info:
        protocol.decode(frames)  # the same message where no slot is attached
    assert info.value.code == "no_slot" and info.value.request_id == 7


def _depth(value: object) -> int:
    """How many levels of lists and maps ``value`` nests (recursive: the reference)."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


_nested = st.recursive(
    st.integers() | st.text(max_size=2),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(_nested, st.integers(1, 8))
def test_too_deep_is_the_nesting_depth_against_a_limit(value: object, limit: int) -> None:
    assert protocol._too_deep(value, limit) == (_depth(value) > limit)
