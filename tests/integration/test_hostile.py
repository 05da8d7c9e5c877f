"""Targeted hostile messages, sent the way an attacker or a buggy peer would: no single message
takes down, stalls or corrupts a server or the coordinator."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

import paramserver as ps
from paramserver.wire.transport import new_context
from tests.procs import rss_mib

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
    assert all(p.poll() is None for p in cluster.children.alive()) and len(
        cluster.children.alive()
    ) == len(cluster.pids)
    assert emb.pull(keys).tobytes() == before
    client.barrier()  # the coordinator still serves


def test_lease_and_barrier_floods_are_refused_within_the_coordinators_limits(
    cluster: ps.LocalCluster,
) -> None:
    """acquire_lease with 2**24 parts, then a peer waiting at hundreds of barrier names: each
    is refused with the limit it passed, the coordinator keeps its memory and its leases."""
    client = cluster.connect()
    part = client.acquire_lease("real", 1, shards=8)
    coordinator = cluster.pids["coordinator"]
    before = rss_mib(coordinator)
    for name in ("big", "bigger", "biggest", "huge"):
        with pytest.raises(ps.errors.PSError, match=r"Limits\(lease_parts=\.\.\.\)"):
            client.acquire_lease(name, 1, shards=2**24)
    assert rss_mib(coordinator) - before < 64  # today's main kept ~640 MiB per request
    ctx = new_context()
    peer = ctx.socket(zmq.DEALER)  # another peer, naming a rank no one has
    try:
        peer.connect(cluster.address)
        for i in range(40):
            header = {"v": 1, "kind": "barrier", "id": i + 1, "name": f"b{i}", "rank": 1}
            peer.send_multipart([msgpack.packb({**header, "timeout": 1e9})])
        answers = []
        while len(answers) < 24 and peer.poll(10_000):
            answers.append(msgpack.unpackb(peer.recv_multipart()[0]))
    finally:
        peer.close(0)
        ctx.term()
    assert [a["id"] for a in answers] == list(range(17, 41)), answers[:2]  # 16 wait
    assert all("Limits(peer_barriers=...)" in a["message"] for a in answers)
    rest = {client.acquire_lease("real", 1, shards=8) for _ in range(7)}
    assert sorted({part, *rest}) == list(range(8))  # the real book is intact
    client.barrier()  # the real worker still meets the others
