"""The bulk channel (paramserver.wire.bulk): large dense values over raw TCP beside ZeroMQ give the
same results as NumPy, bad input and broken peers change nothing and hang no one, and with a
cluster token the payloads travel sealed (a record tampered with or replayed is refused and
changes nothing), or, without the cryptography package (or with transport="zmq"), everything
stays on ZeroMQ."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import RemoteError
from paramserver.wire import bulk, seal
from paramserver.wire.transport import Endpoint, new_context
from tests import procs
from tests.timing import FAST, wait_until

pytestmark = pytest.mark.timeout(120)

PROGRAM = str(Path(__file__).parent / "programs" / "bulk_worker.py")
N = 3 * 400_000  # 1.6 MB per range on 3 servers: above the bulk channel's 1 MiB threshold


def _bulk_open(client: Any) -> dict[str, bool]:
    return {n: p.bulk is not None for n, p in client._ep.peers.items() if n.startswith("server")}


def _raw_push(client: Any, w: Any, s: int, grad: np.ndarray) -> Any:
    """A push of server ``s``'s part sent as a worker would, past the client's own checks."""
    header = {"kind": "push", "table": w.name, "rank": client.rank, "clock": client.current_clock}
    header["seq"] = client.next_seq()
    return client._ep.request(f"server[{s}]", header, [grad], what="raw push", bulk=True)


@pytest.mark.parametrize(("opt", "consistency"), [("sgd", "async"), ("adagrad", "sync")])
def test_values_match_numpy_over_several_servers(opt: str, consistency: str) -> None:
    with ps.LocalCluster(servers=3, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect(transport="tcp")
        optimizer = (
            ps.optim.SGD(lr=0.5)
            if opt == "sgd"
            else ps.optim.Adagrad(lr=0.5, initial_accumulator=0.1)
        )
        w = client.dense_table(
            "w", shape=(N,), init=ps.init.Constant(1.0), optimizer=optimizer,
            consistency=consistency,
        )  # fmt: skip
        assert len(w.spec.ranges) == 3
        rng = np.random.default_rng(7)
        ref = np.ones(N, np.float32)
        acc = np.full(N, 0.1, np.float32)
        out = np.empty(N, np.float32)
        for step in range(4):
            g = rng.standard_normal(N).astype(np.float32)
            if step % 2:
                w.push_buffer()[:] = g
                w.push(w.push_buffer()).result()
            else:
                w.push(g).result()
            client.clock()
            if opt == "sgd":
                ref = ref - np.float32(0.5) * g
            else:
                acc = acc + g * g
                ref = ref - np.float32(0.5) * g / (np.sqrt(acc) + np.float32(1e-10))
            # two pulls in flight at once: their payloads arrive in the order of their headers
            first, second = w.pull_async(), w.pull_async(out=out)
            np.testing.assert_allclose(first.result(), ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(second.result(), first.result())
            view = w.pull(copy=False)
            assert not view.flags.writeable
            np.testing.assert_array_equal(view, first.result())
        assert _bulk_open(client) == {f"server[{s}]": True for s in range(3)}
        # a small table stays on ZeroMQ frames, beside the bulk channel
        small = client.dense_table("small", shape=(1000,), optimizer=ps.optim.SGD(lr=1.0))
        small.push(np.ones(1000, np.float32)).result()
        np.testing.assert_array_equal(small.pull(), -np.ones(1000, np.float32))


@pytest.fixture
def one_server() -> Any:
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST) as cluster:
        yield cluster


def test_bad_gradients_are_refused_and_change_nothing(one_server: ps.LocalCluster) -> None:
    client = one_server.connect(transport="tcp")
    n = 1 << 20
    w = client.dense_table(
        "w", shape=(n,), init=ps.init.Constant(2.0), optimizer=ps.optim.SGD(lr=1.0)
    )
    before = w.pull()
    assert _bulk_open(client) == {"server[0]": True}
    bad = np.ones(n, np.float32)
    bad[n - 1] = np.nan  # in the very last piece to arrive
    with pytest.raises(RemoteError, match="NaN or Inf") as err:
        _raw_push(client, w, 0, bad).result(10)
    assert err.value.code == "non_finite"
    np.testing.assert_array_equal(w.pull(), before)
    # a payload of the wrong size is read in full, then refused: the channel stays in step
    with pytest.raises(RemoteError, match="gradient must be") as err:
        _raw_push(client, w, 0, np.ones(n - 1, np.float32)).result(10)
    assert err.value.code == "invalid"
    assert _bulk_open(client) == {"server[0]": True}
    np.testing.assert_array_equal(w.pull(), before)
    w.push(np.ones(n, np.float32)).result()
    np.testing.assert_array_equal(w.pull(), before - 1.0)
    # nonfinite="skip": the server drops the whole dense gradient
    s = client.dense_table("s", shape=(n,), init=ps.init.Constant(2.0), nonfinite="skip")
    s.push(bad).result()
    np.testing.assert_array_equal(s.pull(), np.full(n, 2.0, np.float32))
    assert client.stats()[0]["tables"]["s"]["skipped_nonfinite"] == 1


def _congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


@pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="Linux only")
def test_bulk_connections_use_cubic_where_the_kernel_has_it(one_server: ps.LocalCluster) -> None:
    # what the kernel offers, read from it: cubic where built in, else the machine's default
    proc = Path("/proc/sys/net/ipv4")
    offered = (proc / "tcp_available_congestion_control").read_text().split()
    want = "cubic" if "cubic" in offered else (proc / "tcp_congestion_control").read_text().strip()
    client = one_server.connect(transport="tcp")
    w = client.dense_table("w", shape=(1 << 20,))
    w.push(np.ones(1 << 20, np.float32)).result()
    channel = client._ep.peers["server[0]"].bulk
    assert channel is not None and _congestion(channel.sock) == want
    # no pacing asked for on one host (SO_MAX_PACING_RATE, 47, unlimited: all ones; what the
    # default's set-up may leave on shows in no socket option, only in the send's CPU)
    assert channel.sock.getsockopt(socket.SOL_SOCKET, 47, 8) == b"\xff" * 8
    listener = bulk.Listener("127.0.0.1", idle=5.0)  # a server's: its connections inherit it
    try:
        assert _congestion(listener.sock) == want
    finally:
        listener.close()


def test_a_pull_keeps_the_values_it_was_answered_with(one_server: ps.LocalCluster) -> None:
    client = one_server.connect(transport="tcp")
    n = 4 << 20  # far more than the socket buffers hold: most of the reply is still unsent
    w = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
    before = w.pull()
    for _ in range(3):
        pulled = w.pull_async()  # answered first, written from the weights as the socket allows
        pushed = w.push(np.ones(n, np.float32))  # applied while that reply is being written
        np.testing.assert_array_equal(pulled.result(), before)
        pushed.result()
        before = before - 1.0
        np.testing.assert_array_equal(w.pull(), before)


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(16) == b""
    except ConnectionError:
        return True


def test_garbage_and_wrong_tickets_are_refused(one_server: ps.LocalCluster) -> None:
    client = one_server.connect(transport="tcp")
    n = 1 << 20
    w = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
    w.pull()
    server = client._ep.address_of("server[0]")
    # tickets asked for by another ZeroMQ identity than the client's: worker 1 registers,
    # and the other identity is the first to name its rank on server[0], so it holds it
    one_server.connect(transport="tcp")
    ctx = new_context()
    other = Endpoint(ctx, request_timeout=10)
    other.connect("server[0]", server)
    try:
        reply = other.request("server[0]", {"kind": "open_bulk", "rank": 1}, what="ticket").result(
            10
        )
        port, ticket = reply["port"], reply["ticket"]
        host = server.removeprefix("tcp://").rsplit(":", 1)[0]
        probes = {
            "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "wrong ticket": b"PSBULK01" + ((ticket + 1) % (1 << 63)).to_bytes(8, "little"),
            "silent": b"",
        }
        socks = {k: socket.create_connection((host, port), timeout=5) for k in probes}
        for k, data in probes.items():
            socks[k].sendall(data)
        # the server goes on serving meanwhile
        for i in range(3):
            w.push(np.ones(n, np.float32)).result()
            np.testing.assert_array_equal(w.pull(copy=False), np.full(n, -(i + 1.0), np.float32))
        for k, sock in socks.items():
            assert _closed_by_peer(sock, 10), f"{k}: the server kept the connection open"
            sock.close()
        # the right ticket opens a connection once, and only once
        good = socket.create_connection((host, port), timeout=5)
        good.sendall(b"PSBULK01" + ticket.to_bytes(8, "little"))
        assert good.recv(1) == b"\x01"
        again = socket.create_connection((host, port), timeout=5)
        again.sendall(b"PSBULK01" + ticket.to_bytes(8, "little"))
        assert _closed_by_peer(again, 10)
        good.close()
        again.close()
    finally:
        other.close()
        ctx.term()
    np.testing.assert_array_equal(w.pull(), np.full(n, -3.0, np.float32))
    assert _bulk_open(client) == {"server[0]": True}


def _start_worker(cluster: ps.LocalCluster, mode: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, PROGRAM, cluster.address, mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


def test_a_worker_killed_mid_push_hangs_no_one(one_server: ps.LocalCluster) -> None:
    client = one_server.connect(transport="tcp")
    n = 4 << 20  # the program's table
    w = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
    before = w.pull()
    child = _start_worker(one_server, "half-push")
    assert child.wait(timeout=30) == -signal.SIGKILL  # died half-way through its payload
    w.push(np.ones(n, np.float32)).result(20)
    np.testing.assert_array_equal(w.pull(), before - 1.0)  # the half push changed nothing


def test_a_worker_that_stops_reading_blocks_no_one(one_server: ps.LocalCluster) -> None:
    client = one_server.connect(transport="tcp")
    n = 4 << 20
    w = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
    child = _start_worker(one_server, "no-reading")
    try:
        wait_until(lambda: procs.state(child.pid) == "T", 20, "the program to stop")
        before = w.pull()
        for i in range(3):  # pushes while the stopped worker's replies are still being written
            w.push(np.ones(n, np.float32)).result(10)
            np.testing.assert_array_equal(w.pull(copy=False), before - (i + 1))
        assert client.stats(timeout=10)[0]["tables"]["w"]["pushes"] == 3
    finally:
        child.kill()
        child.wait(timeout=10)
    w.push(np.ones(n, np.float32)).result(10)
    np.testing.assert_array_equal(w.pull(), before - 4)


def test_a_replaced_server_gets_a_new_bulk_channel() -> None:
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect(transport="tcp")
        n = 1 << 20
        w = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
        w.push(np.ones(n, np.float32)).result()
        old = client._ep.peers["server[0]"]
        assert old.bulk is not None
        os.kill(client.stats()[0]["pid"], signal.SIGKILL)
        # waits for the replacement, then asks it (in ZeroMQ frames: no channel to it yet);
        # it has no checkpoint to load, so the table starts again
        start = w.pull(timeout=30)
        assert client.replaced[0] == 1
        w.push(np.ones(n, np.float32)).result()
        np.testing.assert_array_equal(w.pull(), start - 1.0)
        assert client._ep.peers["server[0]"] is not old
        assert _bulk_open(client) == {"server[0]": True}


TOKEN = "correct-horse-battery-staple-42"


def _sealed(client: Any) -> dict[str, bool]:
    return {
        n: p.bulk is not None and p.bulk.sealed
        for n, p in client._ep.peers.items()
        if n.startswith("server")
    }


def _train(client: Any) -> np.ndarray:
    w = client.dense_table(
        "w", shape=(N,), init=ps.init.Constant(1.0),
        optimizer=ps.optim.Adagrad(lr=0.5, initial_accumulator=0.1),
    )  # fmt: skip
    rng = np.random.default_rng(3)
    for _ in range(3):
        w.push(rng.standard_normal(N).astype(np.float32)).result()
        pulled: np.ndarray = w.pull()
    return pulled


def test_with_a_token_values_travel_sealed_and_equal_the_zeromq_path() -> None:
    pytest.importorskip("cryptography")
    results = {}
    for transport in ("tcp", "zmq"):
        with ps.LocalCluster(servers=2, workers=1, timeouts=FAST, token=TOKEN) as cluster:
            client = cluster.connect(transport=transport)
            results[transport] = _train(client)
            want = transport == "tcp"
            assert _sealed(client) == {"server[0]": want, "server[1]": want}
    np.testing.assert_array_equal(results["tcp"], results["zmq"])


class FlipOneBit(seal.Seal):
    """A real sealing of records, one of which has a bit flipped on the way."""

    def seal(self, plain: memoryview, out: bytearray) -> memoryview:
        record = super().seal(plain, out)
        if self.count == 3:
            record[100] ^= 0x01
        return record


class ReplayOne(seal.Seal):
    """A real sealing of records that sends an earlier record again in place of the fourth."""

    kept = b""

    def seal(self, plain: memoryview, out: bytearray) -> memoryview:
        record = super().seal(plain, out)
        if self.count == 2:
            self.kept = bytes(record)
        elif self.count == 4:
            record[:] = self.kept
        return record


@pytest.mark.parametrize("fault", [FlipOneBit, ReplayOne])
def test_a_tampered_or_replayed_sealed_stream_is_refused_and_changes_nothing(
    fault: type[seal.Seal],
) -> None:
    pytest.importorskip("cryptography")
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST, token=TOKEN) as cluster:
        client = cluster.connect(transport="tcp")
        n = 1 << 21  # 8 MiB: 32 records
        w = client.dense_table("w", shape=(n,), init=ps.init.Constant(2.0),
                               optimizer=ps.optim.SGD(lr=1.0))  # fmt: skip
        before = w.pull()
        assert _sealed(client) == {"server[0]": True}
        channel = client._ep.peers["server[0]"].bulk
        channel.writer.seal.__class__ = fault  # the channel's own sealing, one record spoilt
        with pytest.raises(RemoteError, match="failed authentication") as err:
            w.push(np.ones(n, np.float32)).result(10)
        assert err.value.code == "bulk"
        np.testing.assert_array_equal(w.pull(), before)  # on a new channel
        assert _sealed(client) == {"server[0]": True}
        assert client._ep.peers["server[0]"].bulk is not channel
        w.push(np.ones(n, np.float32)).result(10)
        np.testing.assert_array_equal(w.pull(), before - 1.0)


def test_a_sealed_hello_without_the_key_is_refused() -> None:
    pytest.importorskip("cryptography")
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST, token=TOKEN) as cluster:
        client = cluster.connect(transport="tcp")
        n = 1 << 20
        w = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
        w.pull()
        server = client._ep.address_of("server[0]")
        reply = client._ep.request("server[0]", {"kind": "open_bulk", "rank": 0}, what="ticket")
        port, ticket = reply.result(10)["port"], reply.result(10)["ticket"]
        host = server.removeprefix("tcp://").rsplit(":", 1)[0]
        wrong = seal.hello_tag(seal.ticket_key(b"not the cluster secret" * 2, ticket))
        probes = {
            "wrong key": bulk._SEALED_MAGIC + ticket.to_bytes(8, "little") + wrong,
            "plain hello": b"PSBULK01" + ticket.to_bytes(8, "little"),
        }
        for what, hello in probes.items():
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(hello)
                assert _closed_by_peer(sock, 10), f"{what}: the server kept the connection open"
        w.push(np.ones(n, np.float32)).result()
        np.testing.assert_array_equal(w.pull(), -np.ones(n, np.float32))


def test_without_the_cryptography_package_a_token_keeps_values_on_zeromq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # servers in whose Python the package is missing (a package that fails to import shadows it)
    (tmp_path / "cryptography").mkdir()
    (tmp_path / "cryptography" / "__init__.py").write_text("raise ImportError('missing')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    with ps.LocalCluster(servers=1, workers=2, timeouts=FAST, token=TOKEN) as cluster:
        client = cluster.connect(transport="tcp")
        n = 1 << 20
        w = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
        w.push(np.ones(n, np.float32)).result()
        np.testing.assert_array_equal(w.pull(), -np.ones(n, np.float32))
        assert _bulk_open(client) == {"server[0]": False}
        fut = client._ep.request("server[0]", {"kind": "open_bulk", "rank": 0}, what="ticket")
        with pytest.raises(RemoteError, match="cryptography package is missing") as err:
            fut.result(10)
        assert err.value.code == "no_bulk"


def test_the_zmq_transport_keeps_values_on_zeromq() -> None:
    n = 1 << 20
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect(transport="zmq")
        w = client.dense_table("w", shape=(n,), optimizer=ps.optim.SGD(lr=1.0))
        w.push(np.ones(n, np.float32)).result()
        np.testing.assert_array_equal(w.pull(), -np.ones(n, np.float32))
        assert _bulk_open(client) == {"server[0]": False}
