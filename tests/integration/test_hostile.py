"""Targeted hostile messages, sent the way an attacker or a buggy peer would: no single message
takes down, stalls or corrupts a server or the coordinator."""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

import paramserver as ps
from paramserver.config import CheckpointPolicy, Limits, limits_from_env
from paramserver.spec import TableSpec
from paramserver.wire import bulk, protocol
from paramserver.wire.transport import new_context
from tests.procs import rss_mib
from tests.timing import FAST

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
    """acquire_lease with 2**24 parts, then a peer waiting at barriers in another's name: each
    is refused (the limit it passed; the rank is not its own), the coordinator keeps its
    memory and its leases."""
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
    # a peer naming a rank it did not register as is refused at once (the limit of barriers
    # one peer waits at is tests/unit/test_barriers.py's)
    assert [a["id"] for a in answers] == list(range(1, 25)), answers[:2]
    assert all(a["code"] == "identity" for a in answers), answers[:2]
    rest = {client.acquire_lease("real", 1, shards=8) for _ in range(7)}
    assert sorted({part, *rest}) == list(range(8))  # the real book is intact
    client.barrier()  # the real worker still meets the others


class Peer:
    """A raw DEALER to one node: another process's messages, sent as they are."""

    def __init__(self, address: str) -> None:
        self.ctx = new_context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(address)
        self.ids = 0

    def send(self, header: dict[str, object], arrays: tuple[np.ndarray, ...] = ()) -> int:
        self.ids += 1
        self.sock.send_multipart(protocol.encode({**header, "id": self.ids}, arrays))
        return self.ids

    def answers(self, count: int, wait_ms: int = 10_000) -> list[dict[str, object]]:
        got = []
        while len(got) < count and self.sock.poll(wait_ms):
            got.append(protocol.decode(self.sock.recv_multipart())[0])
        return got

    def ready(self) -> int:
        """How many answers have come so far (without waiting)."""
        return len(self.answers(1 << 30, wait_ms=0))

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_a_forged_clock_or_request_in_another_workers_name_changes_nothing(
    cluster: ps.LocalCluster,
) -> None:
    """A clock at 2**40 and a read-only pull at 2**40, both naming worker 0, from another
    connection: refused; the real worker's sync pushes and clocks go on, its clock moving by
    one per clock() (the reference: the same SGD steps in NumPy)."""
    client = cluster.connect()
    emb = client.sparse_table(
        "emb", dim=2, init=ps.init.Zeros(), optimizer=ps.optim.SGD(lr=1.0), consistency="sync"
    )
    keys = np.arange(40, dtype=np.uint64)
    emb.pull(keys)
    peer = Peer(client.view["servers"][0][1])
    try:
        peer.send({"kind": "clock", "rank": 0, "clock": 2**40})
        peer.send(
            {"kind": "pull", "table": "emb", "rank": 0, "clock": 2**40, "create": False,
             "timeout": 5.0},
            (keys,),
        )  # fmt: skip
        answers = peer.answers(2)
    finally:
        peer.close()
    assert [a["code"] for a in answers] == ["identity", "identity"], answers
    expected = np.zeros((40, 2), np.float32)
    for step in range(1, 4):
        grads = np.full((40, 2), step, np.float32)
        emb.push(keys, grads).result(10)  # main: "clock 3 is already finished"
        client.clock()
        expected -= grads
        np.testing.assert_array_equal(emb.pull(keys, timeout=10), expected)
    assert [s["clocks"] for s in client.stats()] == [[3], [3]]
    # the real worker's own clock message naming a far clock moves its clock by one
    far = {"kind": "clock", "rank": 0, "clock": 2**40}
    client.request_server(1, far, what="a far clock").result(10)
    assert [s["clocks"] for s in client.stats()] == [[3], [4]]


def test_requests_that_would_hold_the_loop_wait_aside_or_are_refused() -> None:
    """Ten pushes naming a worker that is not live yet wait for a view aside while the real
    worker's pull is answered (main: each held the loop for a second, the pull came last); a
    pull of more keys than Limits(request_keys) is refused; a create_shard sent straight to a
    server, not through the coordinator, is refused and creates nothing."""
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=4)
        keys = np.arange(100, dtype=np.uint64)
        before = emb.pull(keys).copy()
        peer = Peer(client.view["servers"][0][1])
        try:
            grads = np.ones((100, 4), np.float32)
            for seq in range(10):
                peer.send(
                    {"kind": "push", "table": "emb", "rank": 1, "clock": 0, "seq": seq},
                    (keys, grads),
                )
            np.testing.assert_array_equal(emb.pull(keys), before)
            assert peer.ready() == 0  # the pushes still wait aside; the pull did not
            answers = peer.answers(10)
            assert [a["code"] for a in answers] == ["not_live"] * 10, answers[:1]
            many = np.arange(Limits().request_keys + 1, dtype=np.uint64)
            peer.send(
                {"kind": "pull", "table": "emb", "rank": 1, "clock": 0, "create": True,
                 "timeout": 5.0},
                (many,),
            )  # fmt: skip
            [big] = peer.answers(1, wait_ms=60_000)
            assert big["code"] == "too_large" and "Limits(request_keys=" in str(big["message"])
            spec = TableSpec(name="direct", kind="dense", shape=(1 << 20,))
            peer.send(
                {"kind": "create_shard", "spec": spec.with_ranges([(0, 0, 1 << 20)]).to_wire()}
            )
            [direct] = peer.answers(1)
            assert direct["code"] == "not_registered", direct
        finally:
            peer.close()
        assert "direct" not in client.stats()[0]["tables"]
        assert client.stats()[0]["tables"]["emb"]["rows"] == 100
        np.testing.assert_array_equal(emb.pull(keys), before)


def test_a_table_larger_than_the_limit_is_refused_by_the_coordinator(
    cluster: ps.LocalCluster,
) -> None:
    client = cluster.connect()
    with pytest.raises(ps.errors.RemoteError, match=r"Limits\(table_bytes="):
        client.dense_table("huge", shape=(1 << 38,))
    assert all("huge" not in s["tables"] for s in client.stats())
    client.dense_table("small", shape=(10,))  # the coordinator still creates tables


def test_a_push_refused_as_full_on_one_server_says_what_was_applied(
    cluster: ps.LocalCluster,
) -> None:
    """main: refused with "nothing changed" while the other server had applied its part."""
    client = cluster.connect()
    keys = np.arange(61, dtype=np.uint64)  # an odd count: the two servers get unequal parts
    probe = client.sparse_table("probe", dim=2)
    counts = sorted(len(p[2]) for p in probe._plans.plan(keys, cacheable=False)[0].parts)
    emb = client.sparse_table(
        "capped", dim=2, init=ps.init.Zeros(), optimizer=ps.optim.SGD(lr=1.0),
        max_rows=counts[0],
    )  # fmt: skip
    with pytest.raises(ps.errors.RemoteError, match=r"refused by server\[\d\] but applied on"):
        emb.push(keys, np.ones((61, 2), np.float32)).result(10)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB file system (tmpfs; needs the right to mount, as root in CI's container)."""
    where = tmp_path / "tiny"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_checkpoint_on_a_full_disk_names_every_server_that_failed(
    cluster: ps.LocalCluster, tiny_disk: Path
) -> None:
    """main: "server[0]: 335976 requested and 87008 written", the other server's ENOSPC only
    in its own log."""
    client = cluster.connect()
    emb = client.sparse_table("emb", dim=32)
    emb.pull(np.arange(20_000, dtype=np.uint64))  # ~2.5 MiB a server: neither fits
    with pytest.raises(ps.errors.RemoteError) as err:
        client.save(tiny_disk / "ckpt", timeout=30)
    text = str(err.value)
    for server in ("server[0]", "server[1]"):
        assert re.search(re.escape(server) + r": no space left on device writing /", text), text


def test_a_save_during_a_periodic_round_is_written(tmp_path: Path) -> None:
    """A periodic round waits for clocks the worker has not reached; the worker's save then
    (main: refused, "a checkpoint is already being written") is written, and the periodic
    rounds go on after it."""
    policy = CheckpointPolicy(str(tmp_path / "periodic"), every_seconds=0.2, timeout=60)
    with ps.LocalCluster(servers=2, workers=1, timeouts=FAST, checkpoints=policy) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=4)
        keys = np.arange(100, dtype=np.uint64)
        rows = emb.pull(keys).copy()
        status = client.endpoint.request("coordinator", {"kind": "status"}, what="status")
        status.result(10)  # a periodic round is due 0.2 s in, aimed two clocks ahead
        time.sleep(0.5)  # not a threshold: the round only has to have started (it waits)
        saved = client.save(tmp_path / "mine", timeout=30)
        assert Path(saved).is_dir()
        for _ in range(4):
            client.clock()  # the periodic rounds can complete now
        np.testing.assert_array_equal(emb.pull(keys), rows)


def test_a_trickling_bulk_peer_is_dropped_and_the_others_are_served() -> None:
    """A registered worker announces a 1 MiB push on the bulk channel and sends a byte every
    0.3 s: its push is refused once it falls below the least rate, while it still trickles,
    and the other worker's pull is answered (main: every byte reset the idle timeout, and the
    pull waited for the trickle to end)."""
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        a, b = cluster.connect(), cluster.connect()
        dense = a.dense_table("d", shape=(1 << 18,))  # 1 MiB of float32
        before = dense.pull().copy()
        server = b.view["servers"][0][1]
        reply = b.endpoint.request(
            "server[0]", {"kind": "open_bulk", "rank": b.rank}, what="a bulk ticket"
        ).result(10)
        host = server.split("//")[1].rsplit(":", 1)[0]
        channel = bulk.Channel.open(host, reply["port"], reply["ticket"], idle=5.0, where="s")
        trickling = threading.Event()
        trickling.set()

        def trickle() -> None:
            with contextlib.suppress(OSError):
                for _ in range(60):  # 18 s at most
                    channel.sock.send(b"\x00")
                    time.sleep(0.3)
            trickling.clear()

        push = b.endpoint.request(
            "server[0]",
            {"kind": "push", "table": "d", "rank": b.rank, "clock": 0, "seq": 1, "bulk": 1 << 20},
            what="a trickling push",
        )
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            with pytest.raises(ps.errors.RemoteError, match="least rate"):
                push.result(30)
            np.testing.assert_array_equal(dense.pull(timeout=30), before)
            assert trickling.is_set()  # answered while the slow peer still trickles
        finally:
            channel.close()
            thread.join(20)


def test_limits_set_for_a_cluster_reach_its_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """LocalCluster(limits=) (the PS_LIMIT_* variables of its children) bounds what one request
    may carry: a pull of more keys than request_keys is refused, naming the limit; one within
    it is answered."""
    with ps.LocalCluster(
        servers=1, workers=1, timeouts=FAST, limits=Limits(request_keys=1000)
    ) as cluster:
        emb = cluster.connect().sparse_table("e", dim=2)
        assert emb.pull(np.arange(1000)).shape == (1000, 2)
        with pytest.raises(ps.errors.RemoteError, match="request_keys"):
            emb.pull(np.arange(1001))
        assert emb.client.stats()[0]["tables"]["e"]["rows"] == 1000
    # and a server started by a launcher reads them from its environment
    monkeypatch.setenv("PS_LIMIT_REQUEST_KEYS", "7")
    assert limits_from_env().request_keys == 7
    monkeypatch.setenv("PS_LIMIT_REQUEST_KEYS", "many")
    with pytest.raises(ps.errors.ConfigError, match="PS_LIMIT_REQUEST_KEYS"):
        limits_from_env()
