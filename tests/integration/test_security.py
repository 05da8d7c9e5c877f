"""With a cluster token every socket uses CURVE: no token, no entry; all traffic encrypted."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

import paramserver as ps
from paramserver.cli import _refuse_exposed
from paramserver.errors import ConfigError, NodeLostError, PSTimeoutError, RemoteError
from paramserver.wire.transport import Endpoint, Security, new_context
from tests import procs
from tests.timing import FAST

pytestmark = pytest.mark.timeout(60)
TOKEN = "correct-horse-battery-staple-42"
# a client with a wrong token is never answered: its connect times out, so make that short
SECURE = replace(FAST, heartbeat_timeout=3.0, request=10.0, connect=2.0)
MARKER = np.frombuffer(b"PLAINTEXT-MARKER" * 4, dtype=np.float32).copy()  # 16 floats


@pytest.fixture
def secure() -> Iterator[ps.LocalCluster]:
    with ps.LocalCluster(servers=2, workers=2, timeouts=SECURE, token=TOKEN) as cluster:
        yield cluster


def test_members_with_the_token_train_normally(secure: ps.LocalCluster) -> None:
    client = secure.connect()
    emb = client.sparse_table("emb", dim=2, optimizer=ps.optim.SGD(lr=1.0))
    emb.push(np.arange(10), np.ones((10, 2), np.float32)).result()
    np.testing.assert_array_equal(emb.pull(np.arange(10)), -np.ones((10, 2), np.float32))


@pytest.mark.parametrize("token", [None, "a-wrong-token-of-enough-length"])
def test_a_peer_without_the_token_cannot_register(
    secure: ps.LocalCluster, token: str | None
) -> None:
    with pytest.raises(PSTimeoutError, match="another cluster token"):
        ps.connect(secure.address, token=token, timeouts=SECURE)


def test_a_peer_without_the_token_cannot_pull_or_push(secure: ps.LocalCluster) -> None:
    client = secure.connect()
    emb = client.sparse_table("emb", dim=16, optimizer=ps.optim.SGD(lr=1.0))
    keys = np.arange(50, dtype=np.uint64)
    before = emb.pull(keys).tobytes()
    address = client.view["servers"][0][1]
    for security in (None, Security.from_token("a-wrong-token-of-enough-length")):
        ctx = new_context()
        ep = Endpoint(ctx, request_timeout=1.0, security=security)
        try:
            ep.connect("server", address)
            push = ep.request(
                "server",
                {"kind": "push", "table": "emb", "rank": 0, "clock": 0, "seq": 2**62},
                [keys, np.ones((50, 16), np.float32)],
                what="intruder push",
            )
            pull = ep.request(
                "server",
                {
                    "kind": "pull",
                    "table": "emb",
                    "rank": 0,
                    "clock": 0,
                    "create": True,
                    "timeout": 1.0,
                },
                [keys],
                what="intruder pull",
            )
            for fut in (push, pull):
                with pytest.raises((PSTimeoutError, NodeLostError)):
                    fut.result(1.0)
        finally:
            ep.close()
            ctx.term()
    assert emb.pull(keys).tobytes() == before


class Recorder:
    """A TCP proxy on loopback that forwards to ``target`` and keeps every byte it saw."""

    def __init__(self, target: str) -> None:
        host, port = target[len("tcp://") :].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.listener.close()


def push_through_proxy(cluster: ps.LocalCluster, security: Security | None) -> bytes:
    client = cluster.connect()
    t = client.sparse_table("secret-table-name", dim=16, optimizer=ps.optim.SGD(lr=1.0))
    owner = int(client.ring.route(np.array([7], np.uint64))[0])
    before = t.pull(np.array([7]))[0].copy()  # worker 0's connection now holds its rank there
    proxy = Recorder(client.view["servers"][owner][1])
    ctx = new_context()
    ep = Endpoint(ctx, request_timeout=5.0, security=security)
    try:
        ep.connect("server", proxy.address)
        # it arrives, and the server answers in its own words: worker 0's rank is held by the
        # worker's own connection, so this one's push is refused and changes nothing
        with pytest.raises(RemoteError, match=r"worker\[0\] is held by another connection"):
            ep.request(
                "server",
                {"kind": "push", "table": "secret-table-name", "rank": 0, "clock": 0, "seq": 1},
                [np.array([7], np.uint64), MARKER[None]],
                what="push through the proxy",
            ).result(5.0)
    finally:
        ep.close()
        ctx.term()
        proxy.close()
    np.testing.assert_array_equal(t.pull(np.array([7]))[0], before)
    with proxy.lock:
        return bytes(proxy.seen)


def test_traffic_is_encrypted(secure: ps.LocalCluster) -> None:
    seen = push_through_proxy(secure, Security.from_token(TOKEN))
    assert len(seen) > 64
    assert b"PLAINTEXT-MARKER" not in seen and b"secret-table-name" not in seen


def test_without_a_token_the_same_capture_shows_plaintext() -> None:
    # the control: proves the capture above would have seen the bytes if they were clear
    with ps.LocalCluster(servers=1, workers=1, timeouts=SECURE) as cluster:
        seen = push_through_proxy(cluster, None)
    assert b"PLAINTEXT-MARKER" in seen and b"secret-table-name" in seen


def test_the_token_is_never_logged_nor_on_a_command_line() -> None:
    out = io.StringIO()
    with ps.LocalCluster(
        servers=1, workers=1, timeouts=SECURE, token=TOKEN, log_level="DEBUG", output=out
    ) as cluster:
        cluster.connect().sparse_table("t", dim=2).pull(np.arange(3))
        for pid in cluster.pids.values():
            cmd = procs.cmdline(pid)
            assert cmd, f"no command line for pid {pid}"  # an empty one would prove nothing
            assert TOKEN not in cmd
    assert "registered" in out.getvalue() or "bound" in out.getvalue()  # the logs were captured
    assert TOKEN not in out.getvalue()
    assert TOKEN not in repr(Security.from_token(TOKEN))


def test_short_tokens_and_exposed_binds_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        Security.from_token("short")
    with pytest.raises(ConfigError, match="without a cluster token"):
        _refuse_exposed("0.0.0.0", False, None, "server")
    _refuse_exposed("0.0.0.0", False, TOKEN, "server")  # a token makes it safe
    _refuse_exposed("0.0.0.0", True, None, "server")  # so does an explicit --insecure
    _refuse_exposed("127.0.0.1", False, None, "server")


def test_the_token_can_come_from_a_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "token")
    with open(path, "w") as f:
        f.write(TOKEN + "\n")
    from paramserver.config import from_env

    assert from_env({"PS_TOKEN_FILE": path}).token == TOKEN
    with pytest.raises(ConfigError, match="cannot read the token file"):
        from_env({"PS_TOKEN_FILE": path + ".missing"})
