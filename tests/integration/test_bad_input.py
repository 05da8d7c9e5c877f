"""Bad input gets a clear error and changes nothing; the cluster keeps serving."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import zmq

import paramserver as ps
from paramserver.errors import ConfigError, PSTimeoutError, RemoteError
from paramserver.wire import protocol
from paramserver.wire.transport import new_context

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def table(cluster: ps.LocalCluster) -> ps.SparseTable:
    client = cluster.connect()
    t = client.sparse_table(
        "emb", dim=4, init=ps.init.Normal(std=0.1), optimizer=ps.optim.Adagrad(lr=0.1)
    )
    t.pull(np.arange(100, dtype=np.uint64))
    return t


def snapshot(t: ps.SparseTable) -> bytes:
    return t.pull(np.arange(100, dtype=np.uint64), create=False).tobytes()


def test_keys_must_be_non_negative_integers(table: ps.SparseTable) -> None:
    before = snapshot(table)
    with pytest.raises(ConfigError, match=r"'emb'.*unsigned integers.*float64"):
        table.pull(np.array([1.0, 2.0]))
    with pytest.raises(ConfigError, match=r"non-negative.*-3 at position 1"):
        table.push(np.array([1, -3]), np.zeros((2, 4), np.float32))
    assert snapshot(table) == before


def test_gradient_shape_and_dtype_must_match(table: ps.SparseTable) -> None:
    before = snapshot(table)
    with pytest.raises(ConfigError, match=r"shape must be \(2, 4\), got \(2, 3\)"):
        table.push(np.array([1, 2]), np.zeros((2, 3), np.float32))
    with pytest.raises(ConfigError, match="dtype must be float32, got float64"):
        table.push(np.array([1, 2]), np.zeros((2, 4)))
    assert snapshot(table) == before


@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_are_refused(table: ps.SparseTable, bad: float, repeats: bool) -> None:
    # repeated keys: checked in the pass that sums them (a NaN or Inf stays in the sum)
    before = snapshot(table)
    grads = np.zeros((100, 4), np.float32)
    grads[57, 2] = bad
    keys = np.arange(100) % 7 if repeats else np.arange(100)
    with pytest.raises(ConfigError, match=r"'emb'.*NaN or Inf"):
        table.push(keys, grads)
    assert snapshot(table) == before


def test_finite_gradients_whose_sum_overflows_are_refused_by_the_servers(
    table: ps.SparseTable,
) -> None:
    """Every value finite, but two rows of one key sum to Inf: the worker's check of the sums
    does not call the gradient NaN or Inf, and it does not tell the servers it found the
    values finite either, so they scan the summed rows (in a shared slot here: 20,000 rows)
    and the server holding that key refuses its part, its rows unchanged (the others apply
    theirs, as with any push refused by some servers)."""
    key = np.array([57], np.uint64)
    before = table.pull(key, create=False)
    keys = np.tile(np.arange(20_000), 2)
    grads = np.ones((len(keys), 4), np.float32)
    grads[[57, 20_057], 1] = np.finfo(np.float32).max
    with pytest.raises(RemoteError, match=r"push to table 'emb'.*NaN or Inf.*unchanged"):
        table.push(keys, grads).result()
    assert table.pull(key, create=False).tobytes() == before.tobytes()


def raw_request(client: ps.Client, header: dict, arrays=()):  # type: ignore[no-untyped-def]
    """A request to server[0] past the client's checks, on the worker's own connection (a
    server takes a message naming worker 0 only from the connection that holds that rank)."""
    return client.endpoint.request("server[0]", header, arrays, what="raw request").result(5.0)


def server_addresses(table: ps.SparseTable) -> list[str]:
    return [addr for _, addr, _ in table.client.view["servers"]]


def test_server_refuses_non_finite_push_even_from_a_bypassing_client(table: ps.SparseTable) -> None:
    before = snapshot(table)
    keys = np.arange(100, dtype=np.uint64)
    owners = table.client.ring.route(keys)
    mine = keys[owners == 0]
    grads = np.full((len(mine), 4), np.nan, np.float32)
    header = {"kind": "push", "table": "emb", "rank": 0, "clock": 0, "seq": 2**62}
    with pytest.raises(RemoteError, match=r"push to table 'emb'.*NaN or Inf.*unchanged"):
        raw_request(table.client, header, [mine, grads])
    assert snapshot(table) == before


def test_unknown_table_is_named(table: ps.SparseTable) -> None:
    header = {
        "kind": "pull",
        "table": "nope",
        "rank": 0,
        "clock": 0,
        "create": True,
        "timeout": 5.0,
    }
    with pytest.raises(RemoteError, match=r"table 'nope' does not exist on server\[0\]"):
        raw_request(table.client, header, [np.arange(3, dtype=np.uint64)])


def test_a_header_outside_its_schema_is_answered_at_once_with_the_reason(
    table: ps.SparseTable,
) -> None:
    # a readable header with an unknown or ill-typed field is refused to its sender by id:
    # the request fails now, naming the field, instead of waiting out its timeout
    before = snapshot(table)
    keys = np.arange(8, dtype=np.uint64)
    base = {"kind": "pull", "table": "emb", "rank": 0, "clock": 0, "create": True, "timeout": 5.0}
    for header, field in [
        ({**base, "colour": "red"}, "unexpected field 'colour'"),
        ({**base, "timeout": "soon"}, "field 'timeout' has an invalid value"),
        ({k: v for k, v in base.items() if k != "table"}, "missing field 'table'"),
    ]:
        with pytest.raises(RemoteError, match=field):  # not PSTimeoutError: it is answered
            raw_request(table.client, header, [keys])
    assert snapshot(table) == before


def test_wrong_shape_reaching_the_server_is_refused(table: ps.SparseTable) -> None:
    before = snapshot(table)
    header = {"kind": "push", "table": "emb", "rank": 0, "clock": 0, "seq": 2**62}
    keys = np.arange(3, dtype=np.uint64)
    with pytest.raises(RemoteError, match=r"gradient must be \(3, 4\) float32, got \(3, 5\)"):
        raw_request(table.client, header, [keys, np.zeros((3, 5), np.float32)])
    with pytest.raises(RemoteError, match="keys must be a 1-D uint64"):
        raw_request(
            table.client,
            header,
            [keys.astype(np.float64), np.zeros((3, 4), np.float32)],
        )
    assert snapshot(table) == before


def test_garbage_on_the_server_port_does_not_disturb_anyone(table: ps.SparseTable) -> None:
    before = snapshot(table)
    address = server_addresses(table)[0]
    host, port = address[len("tcp://") :].rsplit(":", 1)
    # bytes that are not even ZeroMQ
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
        time.sleep(0.1)
    # ZeroMQ frames that are not this protocol: each gets an error reply
    ctx = new_context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    rng = np.random.default_rng(0)
    good = protocol.encode(
        {
            "kind": "pull",
            "id": 1,
            "table": "emb",
            "rank": 0,
            "clock": 0,
            "create": True,
            "timeout": 5.0,
        },
        [np.arange(3, dtype=np.uint64)],
    )
    messages = [
        [b"\xc1\xc1"],
        [b"not msgpack at all"],
        [protocol.encode({"kind": "pull", "id": 1})[0]],  # missing fields
        [bytes(good[0]), b"short"],  # frame length disagrees with the header
        [bytes(good[0])],  # missing frame
        [rng.bytes(64) for _ in range(3)],
    ]
    for m in messages:
        sock.send_multipart(m)
        assert sock.poll(5000), f"no answer to {m!r}"
        header, _ = protocol.decode(sock.recv_multipart())
        assert header["kind"] == "error" and header["code"] == "protocol"
    sock.close(0)
    ctx.term()
    # everyone else is still served, and nothing changed
    assert snapshot(table) == before
    table.push(np.array([1], np.uint64), np.ones((1, 4), np.float32)).result()
    assert snapshot(table) != before


def test_nobody_listening_times_out_naming_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(PSTimeoutError, match=f"127.0.0.1:{port}"):
        ps.connect(f"127.0.0.1:{port}", timeouts=ps.Timeouts(connect=1.0))
    assert time.monotonic() - start < 10


def test_bad_table_specs_are_refused_before_anything_is_sent(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    with pytest.raises(ConfigError, match="dim"):
        client.sparse_table("x", dim=0)
    with pytest.raises(ConfigError, match="consistency"):
        client.sparse_table("x", dim=2, consistency="ssp:-1")
    with pytest.raises(ConfigError, match="dtype"):
        client.dense_table("x", shape=(2,), dtype="int32")
    assert client.tables() == []


def test_nonfinite_skip_drops_only_the_bad_rows(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    t = client.sparse_table("skip", dim=2, optimizer=ps.optim.SGD(lr=1.0), nonfinite="skip")
    grads = np.ones((6, 2), np.float32)
    grads[1, 0] = np.nan
    grads[4, 1] = np.inf
    t.push(np.arange(6), grads).result()
    rows = t.pull(np.arange(6), create=False)
    np.testing.assert_array_equal(rows[[0, 2, 3, 5]], -np.ones((4, 2), np.float32))
    np.testing.assert_array_equal(rows[[1, 4]], np.zeros((2, 2), np.float32))
    assert sum(s["tables"]["skip"]["skipped_nonfinite"] for s in client.stats()) == 2
    d = client.dense_table("dskip", shape=(3,), optimizer=ps.optim.SGD(lr=1.0), nonfinite="skip")
    d.push(np.array([1.0, np.nan, 1.0], np.float32)).result()
    np.testing.assert_array_equal(d.pull(), np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match="nonfinite"):
        client.sparse_table("bad", dim=2, nonfinite="ignore")


def test_a_full_table_refuses_new_rows_and_changes_nothing(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    t = client.sparse_table("capped", dim=2, optimizer=ps.optim.SGD(lr=1.0), max_rows=50)
    keys = np.arange(40, dtype=np.uint64)
    t.push(keys, np.ones((40, 2), np.float32)).result()  # ~20 rows on each of 2 servers
    before = t.pull(keys, create=False).tobytes()
    rows_before = [s["tables"]["capped"]["rows"] for s in client.stats()]
    with pytest.raises(RemoteError, match=r"'capped' is full on server\[\d\].*max_rows is 50") as e:
        t.pull(np.arange(1000, 1200))
    assert e.value.code == "full"
    with pytest.raises(RemoteError, match="is full"):
        t.push(np.arange(2000, 2200), np.ones((200, 2), np.float32)).result()
    assert [s["tables"]["capped"]["rows"] for s in client.stats()] == rows_before
    assert t.pull(keys, create=False).tobytes() == before
    t.push(keys, np.ones((40, 2), np.float32)).result()  # existing rows still train
    assert t.pull(np.arange(3000, 3004), create=False).shape == (4, 2)  # eval never creates
    with pytest.raises(ConfigError, match="max_rows is for sparse"):
        from paramserver.spec import TableSpec

        TableSpec(name="x", kind="dense", shape=(2,), max_rows=5)


def test_an_oversized_frame_only_disconnects_its_sender(table: ps.SparseTable) -> None:
    before = snapshot(table)
    ctx = new_context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server_addresses(table)[0])
    sock.send_multipart([b"\x00" * (protocol.MAX_FRAME_BYTES + 1)])
    assert not sock.poll(1000), "an oversized frame must not be answered"
    sock.close(0)
    ctx.term()
    assert snapshot(table) == before
    table.push(np.array([1], np.uint64), np.ones((1, 4), np.float32)).result()  # still serving
