"""Targeted hostile messages, sent the way an attacker or a buggy peer would: no single message
takes down, stalls or corrupts a server or the coordinator."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

import paramserver as ps
from paramserver.wire.transport import new_context

pytestmark = pytest.mark.timeout(60)


def nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def send_raw(address: str, frames: list[bytes], *, answer: bool = True) -> list[bytes] | None:
    """Send ``frames`` from a fresh DEALER; the reply's frames (None if none within 5 s)."""
    ctx = new_context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        if not answer or not sock.poll(5000):
            return None
        return list(sock.recv_multipart())
    finally:
        sock.close(0)
        ctx.term()


def test_a_deeply_nested_header_is_refused_by_server_and_coordinator(
    cluster: ps.LocalCluster,
) -> None:
    client = cluster.connect()
    emb = client.sparse_table("emb", dim=4, init=ps.init.Normal(std=0.1))
    keys = np.arange(50, dtype=np.uint64)
    before = emb.pull(keys).tobytes()
    deep = nested(1000)  # ~1 KB of msgpack: past Python's recursion limit for repr
    server = client.view["servers"][0][1]
    for address, kind, field in ((server, "pull", "table"), (cluster.address, "barrier", "name")):
        header = msgpack.packb({"v": 1, "kind": kind, "id": 5, field: deep}, use_bin_type=True)
        reply = send_raw(address, [header])
        assert reply is not None, f"no answer from {address}"
        answer = msgpack.unpackb(reply[0])
        assert answer["kind"] == "error" and "nests deeper" in answer["message"]
    assert all(p.poll() is None for p in cluster._children.alive()) and len(
        cluster._children.alive()
    ) == len(cluster.pids)
    assert emb.pull(keys).tobytes() == before
    client.barrier()  # the coordinator still serves
