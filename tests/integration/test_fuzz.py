"""10,000 malformed or mutated messages against a live server: it keeps answering and no table
changes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

import paramserver as ps
from paramserver.wire import protocol
from tests.tables import filled_tables

pytestmark = pytest.mark.timeout(180)
MESSAGES = 10_000


def base_messages(dim: int) -> list[list[bytes]]:
    """Requests that a correct server must answer without changing any table. Each is far from
    a valid state-changing request: no single mutation makes it one."""
    keys = np.arange(40, dtype=np.uint64)
    nan = np.full((40, dim), np.nan, np.float32)

    def enc(header: dict, arrays=()) -> list[bytes]:  # type: ignore[no-untyped-def]
        return [bytes(f) for f in protocol.encode({"id": 1, **header}, arrays)]

    return [
        enc({"kind": "ping"}),
        enc({"kind": "stats"}),
        enc(
            {
                "kind": "pull",
                "table": "emb",
                "rank": 0,
                "clock": 0,
                "create": False,
                "timeout": 1.0,
            },
            [keys],
        ),
        enc(
            {
                "kind": "pull",
                "table": "dense",
                "rank": 0,
                "clock": 0,
                "create": False,
                "timeout": 1.0,
            }
        ),
        enc({"kind": "push", "table": "emb", "rank": 0, "clock": 0, "seq": 7}, [keys, nan]),
        enc(
            {"kind": "push", "table": "dense", "rank": 0, "clock": 0, "seq": 8},
            [np.full(1000, np.inf, np.float32)],
        ),
        enc(
            {"kind": "push", "table": "no-such-table", "rank": 0, "clock": 0, "seq": 9},
            [keys, np.ones((40, dim), np.float32)],
        ),
        enc(
            {"kind": "push", "table": "emb", "rank": 0, "clock": 0, "seq": 10},
            [keys, np.ones((40, dim + 3), np.float32)],
        ),
    ]


def mutate(rng: np.random.Generator, frames: list[bytes]) -> list[bytes]:
    frames = [bytearray(f) for f in frames]
    choice = rng.integers(0, 7)
    if choice == 0:  # flip bytes anywhere
        for _ in range(int(rng.integers(1, 8))):
            i = int(rng.integers(0, len(frames)))
            if frames[i]:
                frames[i][int(rng.integers(0, len(frames[i])))] = int(rng.integers(0, 256))
    elif choice == 1:  # truncate or drop frames
        i = int(rng.integers(0, len(frames)))
        frames[i] = frames[i][: int(rng.integers(0, len(frames[i]) + 1))]
        if len(frames) > 1 and rng.random() < 0.5:
            frames.pop(int(rng.integers(1, len(frames))))
    elif choice == 2:  # extra frames
        frames.append(bytearray(rng.bytes(int(rng.integers(0, 64)))))
    elif choice == 3:  # a header field replaced by a value of another type
        header = msgpack.unpackb(bytes(frames[0]))
        field = list(header)[int(rng.integers(0, len(header)))]
        header[field] = [None, -1, 2**63, 1.5, "x" * 300, [], {}, True, b"\x00"][
            int(rng.integers(0, 9))
        ]
        frames[0] = bytearray(msgpack.packb(header, use_bin_type=True))
    elif choice == 4:  # a lying array layout
        header = msgpack.unpackb(bytes(frames[0]))
        if header.get("arrays"):
            entry = header["arrays"][int(rng.integers(0, len(header["arrays"])))]
            entry[int(rng.integers(0, 3))] = [
                "float128",
                [10**12],
                0,
                -1,
                "uint64",
                [3, 3, 3, 3, 3],
                2**40,
            ][int(rng.integers(0, 7))]
        frames[0] = bytearray(msgpack.packb(header, use_bin_type=True))
    elif choice == 5:  # pure noise
        frames = [
            bytearray(rng.bytes(int(rng.integers(0, 200)))) for _ in range(int(rng.integers(1, 4)))
        ]
    else:  # valid msgpack that is not a header
        frames[0] = bytearray(msgpack.packb([1, {"kind": "push"}, "x"]))
    return [bytes(f) for f in frames]


def test_a_server_survives_ten_thousand_bad_messages() -> None:
    with ps.LocalCluster(servers=1, workers=1) as cluster:
        client = cluster.connect()
        emb, dense, keys = filled_tables(client)
        before = (
            emb.pull(keys, create=False).tobytes(),
            dense.pull().tobytes(),
            [s["tables"] for s in client.stats()],
        )

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(client.view["servers"][0][1])
        rng = np.random.default_rng(2026)
        bases = base_messages(8)
        answers = 0
        try:
            for n in range(MESSAGES):
                sock.send_multipart(mutate(rng, bases[n % len(bases)]))
                while sock.poll(0):
                    sock.recv_multipart()
                    answers += 1
            sock.send_multipart([bytes(f) for f in protocol.encode({"kind": "ping", "id": 424242})])
            while True:  # the server is still there, and answers in order
                assert sock.poll(30_000), "the server stopped answering"
                header, _ = protocol.decode(sock.recv_multipart())
                answers += 1
                if header.get("id") == 424242 and header["kind"] == "reply":
                    break
        finally:
            sock.close(0)
            ctx.term()
        assert answers > MESSAGES // 2, "most bad messages should get an error reply"
        after = (
            emb.pull(keys, create=False).tobytes(),
            dense.pull().tobytes(),
            [s["tables"] for s in client.stats()],
        )
        assert after[0] == before[0] and after[1] == before[1]
        rows = [{n: t["rows"] for n, t in s.items()} for s in after[2]]
        assert rows == [{n: t["rows"] for n, t in s.items()} for s in before[2]]
        # and it still does real work
        emb.push(keys, np.ones((40, 8), np.float32)).result()
        assert emb.pull(keys, create=False).tobytes() != before[0]
