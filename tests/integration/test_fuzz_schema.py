"""A schema-aware fuzzer: messages of every valid kind, built from the TypedDicts of
``wire/messages.py``, with hostile values (extreme integers and sizes, other workers' ranks,
deep nesting, wrong types, lying arrays), sent to a live server and coordinator while a real
worker keeps working. Nothing exits, no table or clock changes, the worker's requests keep
completing between the hostile ones (ordering, not a timing threshold), memory stays bounded.

Kinds any peer may send by design and that change the cluster (``shutdown``, ``register``,
``create_table``, ``save``, ``set_lr``, and ``drain``, which moves a server's ranges to the
others: the fuzzer's drain of server 0 emptied it into server 1) are left out: the cluster token
(CURVE) guards those.
"""

from __future__ import annotations

import time
import typing
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paramserver as ps
from paramserver.wire import protocol
from paramserver.wire.messages import MESSAGES
from paramserver.wire.transport import new_context
from tests.procs import rss_mib
from tests.tables import filled_tables

pytestmark = pytest.mark.timeout(180)
BUDGET_S = 45.0  # of hostile messages, server and coordinator together (~1,300 sent)
OPEN_BY_DESIGN = {"shutdown", "register", "create_table", "save", "set_lr", "drain"}

INTS = st.one_of(
    st.sampled_from([0, 1, 2, -1, 7, 2**20, 2**31, 2**40, 2**62, 2**63 - 1, 2**64 - 1, -(2**63)]),
    st.integers(-(2**63), 2**64 - 1),
)
STRS = st.one_of(
    st.sampled_from(["emb", "dense", "", "x" * 129, "x" * 5000, "../../etc/passwd", "/dev/shm/x"]),
    st.text(max_size=40),
)
FLOATS = st.one_of(
    st.sampled_from([0.0, -1.0, 1e-300, 1e300, float("inf"), float("nan")]), st.floats()
)


def nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return value


WRONG = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    FLOATS,
    STRS,
    st.binary(max_size=64),
    st.integers(1, 1100).map(nested),
    st.lists(INTS, max_size=5),
    st.just(list(range(70_000))),  # past the header's item limit
)
SPECS = st.fixed_dictionaries(
    {},
    optional={
        "name": STRS,
        "kind": st.sampled_from(["sparse", "dense", "other"]) | WRONG,
        "dim": INTS,
        "shape": st.lists(INTS, max_size=5) | WRONG,
        "dtype": st.sampled_from(["float32", "float64", "float16", "object"]) | WRONG,
        "ranges": st.lists(st.lists(INTS, min_size=3, max_size=3), max_size=4) | WRONG,
        "optimizer": st.dictionaries(STRS, WRONG, max_size=3) | WRONG,
        "init": st.dictionaries(STRS, WRONG, max_size=3) | WRONG,
        "seed": INTS,
        "max_rows": INTS,
        "consistency": st.sampled_from(["sync", "ssp:3", "async", "ssp:-1"]) | WRONG,
    },
)


def value_for(field: str, tp: Any) -> st.SearchStrategy[Any]:
    """Hostile but well-typed values for one field (and now and then a wrong type)."""
    if typing.get_origin(tp) is typing.NotRequired:
        tp = typing.get_args(tp)[0]
    if field == "rank":
        typed: st.SearchStrategy[Any] = st.sampled_from([0, 0, 0, 1, 2**20]) | INTS
    elif field in ("spec", "view"):
        typed = SPECS
    elif typing.get_origin(tp) is typing.Literal:
        typed = st.sampled_from(typing.get_args(tp))
    elif tp is bool:
        typed = st.booleans()
    elif tp is int:
        typed = INTS
    elif tp is float:
        typed = FLOATS | INTS
    elif tp is str:
        typed = STRS
    else:
        typed = WRONG
    return rarely(WRONG, typed)


def rarely(odd: st.SearchStrategy[Any], usual: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``odd`` one time in eight, else ``usual`` (one_of would weigh them alike)."""
    return st.integers(0, 7).flatmap(lambda i: odd if i == 0 else usual)


def arrays_strategy() -> st.SearchStrategy[list[np.ndarray]]:
    n = st.sampled_from([0, 1, 40, 5000])
    keys = n.map(lambda k: np.arange(k, dtype=np.uint64) * np.uint64(2654435761))
    grads = st.tuples(n, st.sampled_from([1, 4, 8, 9])).map(
        lambda s: np.full(s, np.nan if s[0] % 2 else 1.0, np.float32)
    )
    return st.lists(st.one_of(keys, grads), max_size=3)


def message(kinds: list[str]) -> st.SearchStrategy[tuple[dict[str, Any], list[np.ndarray]]]:
    def build(kind: str) -> st.SearchStrategy[tuple[dict[str, Any], list[np.ndarray]]]:
        hints = typing.get_type_hints(MESSAGES[kind], include_extras=True)
        fields = {f: value_for(f, tp) for f, tp in hints.items() if f not in ("kind", "id")}
        required = {f for f in fields if typing.get_origin(hints[f]) is not typing.NotRequired}
        header = st.tuples(
            st.fixed_dictionaries(
                {f: fields[f] for f in required},
                optional={f: fields[f] for f in fields if f not in required},
            ),
            rarely(WRONG.map(lambda v: {"extra": v}), st.just({})),
        ).map(lambda h: {"kind": kind, **h[0], **h[1]})
        return st.tuples(header, arrays_strategy())

    return st.sampled_from(kinds).flatmap(build)


class Hostile:
    """A raw DEALER that sends whatever it is given and drains whatever comes back."""

    def __init__(self, address: str) -> None:
        self.ctx = new_context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(address)
        self.sent = 0

    def send(self, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.sent += 1
        try:
            frames = protocol.encode({**header, "id": self.sent}, arrays)
        except Exception:  # a value msgpack itself cannot pack: send its noise instead
            frames = [b"\x91\xc1"]
        self.sock.send_multipart(frames)
        while self.sock.poll(0):
            self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def fuzz(target: Hostile, kinds: list[str], seconds: float, between: Any, examples: int) -> int:
    """Send hypothesis' messages of ``kinds`` for up to ``seconds``; ``between()`` (the real
    worker's request) runs after every 25th. The number sent."""
    stop = time.monotonic() + seconds
    count = [0]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(message(kinds))
    def one(msg: tuple[dict[str, Any], list[np.ndarray]]) -> None:
        if time.monotonic() > stop:
            return
        target.send(*msg)
        count[0] += 1
        if count[0] % 25 == 0:
            between()

    one()
    return count[0]


def test_schema_aware_hostile_messages_change_nothing() -> None:
    with ps.LocalCluster(servers=2, workers=1) as cluster:
        client = cluster.connect()
        emb, dense, keys = filled_tables(client)
        client.clock()

        def snapshot() -> tuple[Any, ...]:
            stats = client.stats()
            return (
                emb.pull(keys, create=False).tobytes(),
                dense.pull().tobytes(),
                [{n: t["rows"] for n, t in s["tables"].items()} for s in stats],
                [s["clocks"] for s in stats],
                sorted(
                    t["name"]
                    for t in client.endpoint.request(
                        "coordinator", {"kind": "list_tables"}, what="the tables"
                    ).result(10)["tables"]
                ),
            )

        before = snapshot()
        served = [0]

        def between() -> None:  # the real worker's request completes between hostile ones
            assert emb.pull(keys, create=False, timeout=30).tobytes() == before[0]
            served[0] += 1

        pids = dict(cluster.pids)
        rss = {name: rss_mib(pid) for name, pid in pids.items()}
        server_kinds = sorted(
            k for k in MESSAGES if k not in OPEN_BY_DESIGN and k not in ("reply", "error")
        )
        coordinator_kinds = sorted(k for k in MESSAGES if k not in OPEN_BY_DESIGN)
        server = Hostile(client.view["servers"][0][1])
        coordinator = Hostile(cluster.address)
        try:
            sent = fuzz(server, server_kinds, BUDGET_S * 0.6, between, 800)
            sent += fuzz(coordinator, coordinator_kinds, BUDGET_S * 0.4, between, 500)
        finally:
            server.close()
            coordinator.close()
        assert sent > 200 and served[0] >= sent // 25 - 1
        assert all(p.poll() is None for p in cluster.children.alive())
        assert len(cluster.children.alive()) == len(pids)
        assert snapshot() == before
        grown = {name: rss_mib(pid) - rss[name] for name, pid in pids.items()}
        assert max(grown.values()) < 256, grown
        # and the worker still does real work: a push, a clock, a barrier
        emb.push(keys, np.ones((40, 8), np.float32)).result()
        client.clock()
        client.barrier()
        assert emb.pull(keys, create=False).tobytes() != before[0]
