"""The rules behind no-single-message-harms-a-node, without a socket: who holds a worker rank
on a server, the size limits, a round that names every server that failed, a periodic round
that makes way for a worker's save."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from paramserver.config import CheckpointPolicy, Limits
from paramserver.coordinator.membership import ALIVE, Member
from paramserver.coordinator.refusal import Refusal as CoordinatorRefusal
from paramserver.coordinator.registry import TableRegistry
from paramserver.coordinator.rounds import CheckpointRounds
from paramserver.errors import ProtocolError
from paramserver.server.consistency import Clocks
from paramserver.server.state import ServerState
from paramserver.server.table import make_table
from paramserver.spec import TableSpec
from paramserver.wire import protocol
from paramserver.wire.refusal import Refusal


def state_with(workers: int, registered: set[int]) -> ServerState:
    state = ServerState(Limits(request_keys=10))
    state.clocks = Clocks(workers)
    state.registered = registered
    return state


def test_a_rank_is_held_by_the_first_connection_of_a_registered_worker() -> None:
    state = state_with(3, {0, 1})
    state.claim(0, b"a")
    state.claim(0, b"a")
    with pytest.raises(Refusal) as err:
        state.claim(0, b"b")
    assert err.value.code == "identity"
    with pytest.raises(Refusal, match="not a registered member"):
        state.claim(2, b"b")  # pending: held by no one yet
    with pytest.raises(Refusal, match="out of range"):
        state.claim(3, b"a")
    state.release({0})  # the worker left or came back: its new connection holds it
    state.claim(0, b"b")


def test_requests_past_the_key_limit_are_refused() -> None:
    state = state_with(1, {0})
    spec = TableSpec(name="emb", kind="sparse", dim=2, seed=1)
    state.tables["emb"] = make_table(spec, 0)
    state.check_size({"kind": "pull", "table": "emb"}, [np.arange(10, dtype=np.uint64)])
    with pytest.raises(Refusal, match=r"11 keys .* Limits\(request_keys=10\)"):
        state.check_size({"kind": "pull", "table": "emb"}, [np.arange(11, dtype=np.uint64)])


def test_a_sparse_table_refuses_rows_past_its_bytes() -> None:
    spec = TableSpec(name="emb", kind="sparse", dim=4, seed=1)  # 16 bytes a row here
    table = make_table(spec, 0)
    table.max_bytes = 16 * 5
    table.check_room(np.arange(5, dtype=np.uint64), "server[0]")
    with pytest.raises(Refusal, match=r"Limits\(table_bytes=80\) allows is 5"):
        table.check_room(np.arange(6, dtype=np.uint64), "server[0]")


def test_the_coordinator_refuses_a_dense_table_past_the_bytes_limit() -> None:
    registry = TableRegistry([0, 1], Limits(table_bytes=8 * 50))  # 8 bytes an element here
    registry.create(TableSpec(name="ok", kind="dense", shape=(100,)).to_wire())
    with pytest.raises(CoordinatorRefusal, match=r"Limits\(table_bytes=400\)"):
        registry.create(TableSpec(name="big", kind="dense", shape=(102,)).to_wire())
    assert [s.name for s in registry.specs()] == ["ok"]


def test_a_header_past_the_item_limits_is_a_protocol_error() -> None:
    for bad in ("x" * (protocol.MAX_HEADER_ITEMS + 1), list(range(protocol.MAX_HEADER_ITEMS + 1))):
        raw = msgpack.packb({"v": 1, "kind": "ping", "id": 1, "x": bad})
        with pytest.raises(ProtocolError, match="not valid msgpack"):
            protocol.decode_header(raw)


def test_a_round_fails_naming_every_server_that_failed(tmp_path: Path) -> None:
    rounds = CheckpointRounds(None, now=0.0)
    servers = [Member("server", r, state=ALIVE) for r in range(3)]
    rnd = rounds.start(tmp_path, 0, 60.0, (b"w", 1), servers, now=0.0)
    assert rounds.refused(rnd.round_id, "io", "server[0]: no space", 0) is None
    assert rounds.answered(rnd.round_id, 1) is None
    assert rounds.refused(rnd.round_id, "io", "server[2]: no space", 2) is rnd
    assert rnd.errors == ["server[0]: no space", "server[2]: no space"]


def test_a_periodic_round_makes_way_for_a_workers_save(tmp_path: Path) -> None:
    policy = CheckpointPolicy(str(tmp_path / "p"), every_seconds=1.0)
    rounds = CheckpointRounds(policy, now=0.0)
    servers = [Member("server", r, state=ALIVE) for r in range(2)]
    periodic = rounds.start_periodic(2.0, servers, workers_alive=True)
    assert periodic is not None and rounds.make_way()
    assert not rounds.rounds and not periodic.partial.exists()
    rounds.start(tmp_path / "mine", 0, 60.0, (b"w", 1), servers, now=2.0)
    assert not rounds.make_way()  # a worker's own round is waited for, not dropped
