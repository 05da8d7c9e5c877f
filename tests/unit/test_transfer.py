"""The pure parts of a move: which keys leave a server, which rows changed since the copy,
and a shard rebuilt without the rows that left (checked against NumPy and the ring)."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.coordinator.membership import ALIVE, Membership
from paramserver.init import Normal
from paramserver.optim import Adagrad
from paramserver.partition import HashRing
from paramserver.server.ahead import ran_ahead, refuse_ahead
from paramserver.server.consistency import Clocks
from paramserver.server.recut import DenseMoves
from paramserver.server.shard import SparseShard
from paramserver.server.state import ServerState
from paramserver.server.table import make_table
from paramserver.server.transfer import Transfers, changed_rows, moving_keys
from paramserver.spec import TableSpec
from paramserver.wire.refusal import Refusal
from paramserver.wire.transport import new_context
from tests.unit.test_membership import T, server_msg


def test_moving_keys_names_the_new_owner_of_exactly_the_keys_that_leave() -> None:
    keys = np.arange(10_000, dtype=np.uint64)
    old, new = HashRing.build([0, 1]), HashRing.build([0, 1, 2])
    for me in (0, 1):
        mine = old.route(keys) == me
        owner = moving_keys(keys[mine], new, me)
        want = new.route(keys[mine]).astype(np.int32)
        want[want == me] = -1
        np.testing.assert_array_equal(owner, want)
        # consistent hashing: what leaves goes to the newcomer only
        assert set(owner[owner >= 0].tolist()) == {2}
    assert len(moving_keys(keys[:0], new, 0)) == 0


def test_changed_rows_compares_bits_and_counts_new_rows() -> None:
    old = np.array([[0.0, 1.0], [2.0, np.nan], [3.0, 4.0]], np.float32)
    new = np.array([[-0.0, 1.0], [2.0, np.nan], [3.0, 4.5], [7.0, 7.0]], np.float32)
    # -0.0 == 0.0 for NumPy, but not for a copy that must be bitwise the same; the same NaN
    # bits are no change
    np.testing.assert_array_equal(changed_rows(old, new), [True, False, True, True])
    np.testing.assert_array_equal(changed_rows(old[:0], new), [True] * 4)


def test_a_delta_over_a_copy_rebuilds_the_source_rows_bit_for_bit() -> None:
    src = SparseShard(4, "float32", Normal(std=0.1), Adagrad(lr=0.1), seed=5)
    rng = np.random.default_rng(0)
    src.push(rng.integers(0, 500, 300).astype(np.uint64), rng.normal(size=(300, 4)).astype("f4"))
    copy = src.export()
    src.push(rng.integers(0, 800, 300).astype(np.uint64), rng.normal(size=(300, 4)).astype("f4"))
    now = src.export()
    delta = changed_rows(copy["rows"], now["rows"])
    dst = SparseShard(4, "float32", Normal(std=0.1), Adagrad(lr=0.1), seed=5)
    dst.load(copy["keys"], copy["rows"])
    dst.load(now["keys"][delta], now["rows"][delta])
    assert delta.sum() < len(delta)  # some rows did not change: the delta is smaller
    back = dst.export()
    order = np.argsort(back["keys"])
    want = np.argsort(now["keys"])
    assert back["rows"][order].tobytes() == now["rows"][want].tobytes()


def test_a_server_registering_with_a_running_job_joins_off_the_ring() -> None:
    members = Membership(2, 1, T)
    for r in (0, 1):
        members.register_server(f"s{r}".encode(), server_msg(rank=r), 0.0)
    members.wait(b"w", {"kind": "register", "id": 2, "role": "worker"}, 0.0)
    [(identity, h, _)] = members.admissible()
    members.admit_worker(identity, h, 0.0)
    m, replacing = members.register_server(b"s2", server_msg(), 0.0)
    assert (m.rank, m.state, replacing) == (2, ALIVE, False)
    assert members.ring == [0, 1] and members.view()["ring"] == [0, 1]


def test_a_source_sends_the_moves_view_to_the_workers_not_switched_once_one_did() -> None:
    # the bound on the switches: a worker whose view from the coordinator is late gets it from
    # the source with the first answer that waited on the switched worker's later clocks
    state = ServerState()
    state.rank, state.name = 0, "server[0]"
    state.clocks = Clocks(3)
    ctx = new_context()
    transfers = Transfers(state, ctx, None, lambda: None, lambda m: None, timeout=5.0)
    told: list[tuple[int, int]] = []
    transfers.notify = lambda rank, view: told.append((rank, view["number"]))
    view = {"number": 7, "ring": [0, 1],
            "servers": [[0, "tcp://127.0.0.1:1", "alive"], [1, "tcp://127.0.0.1:2", "alive"],
                        [2, "tcp://127.0.0.1:3", "alive"]],
            "move": {"id": 1, "from": [0, 1], "to": [0, 1, 2], "view": 7}}  # fmt: skip
    try:
        transfers.on_switched(2, 1)  # before this server saw the view: told once it does
        assert told == []
        transfers.on_view(view)
        assert told == [(0, 7), (1, 7)]
        transfers.on_switched(0, 1)
        assert transfers.out is not None and not transfers.out.finished
        transfers.on_switched(1, 1)
        assert told == [(0, 7), (1, 7)]  # once each
        # the last switched: the final step at once, before the clock message behind it
        assert transfers.out.finished
        state.clocks.set_live({0, 1})  # a move with no worker switched tells no one
        transfers.out, transfers.seen = None, set()
        told.clear()
        transfers.on_view({**view, "move": {**view["move"], "id": 2}})
        assert told == []
        transfers.on_switched(1, 2)
        assert told == [(0, 7)]
    finally:
        transfers.close()
        ctx.term()


def test_a_source_sends_back_only_the_pulls_that_ran_ahead_of_a_switched_worker() -> None:
    # worker[0] switched at a step's end and reads by the new ring from clock 5: a sync pull
    # of worker[1] (not switched) at clock 6 needs worker[0]'s pushes of clock 5, which went
    # to the new owner; one at clock 5 does not; ssp:1 allows one clock more, async any
    state = ServerState()
    state.rank, state.name = 0, "server[0]"
    state.clocks = Clocks(2)
    for name, consistency in (("emb", "sync"), ("ssp", "ssp:1"), ("fast", "async")):
        spec = TableSpec(name=name, kind="sparse", dim=2, seed=1, consistency=consistency)
        state.tables[name] = make_table(spec, 0)
    ctx = new_context()
    transfers = Transfers(state, ctx, None, lambda: None, lambda m: None, timeout=5.0)
    told: list[int] = []
    transfers.notify = lambda rank, view: told.append(rank)
    view = {"number": 7, "ring": [0, 1], "servers": [[0, "tcp://127.0.0.1:1", "alive"],
            [1, "tcp://127.0.0.1:2", "alive"], [2, "tcp://127.0.0.1:3", "alive"]],
            "move": {"id": 1, "from": [0, 1], "to": [0, 1, 2], "view": 7}}  # fmt: skip

    def pull(table: str, rank: int, clock: int) -> dict[str, object]:
        return {"kind": "pull", "table": table, "rank": rank, "clock": clock}

    try:
        transfers.on_view(view)
        assert ran_ahead(transfers.out, state, pull("emb", 1, 9)) is None  # nobody switched
        transfers.on_switched(0, 1, since=5)
        assert ran_ahead(transfers.out, state, pull("emb", 1, 5)) is None
        why = ran_ahead(transfers.out, state, pull("emb", 1, 6))
        assert why is not None and "worker[0]" in why and "clock 5" in why
        assert ran_ahead(transfers.out, state, pull("ssp", 1, 6)) is None
        assert ran_ahead(transfers.out, state, pull("ssp", 1, 7)) is not None
        assert ran_ahead(transfers.out, state, pull("fast", 1, 60)) is None
        assert ran_ahead(transfers.out, state, pull("emb", 0, 60)) is None  # switched itself
        with pytest.raises(Refusal) as err:
            refuse_ahead(transfers.out, state, pull("emb", 1, 6), transfers.notify)
        assert err.value.code == "moved" and told == [1, 1]  # the view first (tell_late too)
    finally:
        transfers.close()
        ctx.term()


def test_a_dense_primary_that_keeps_its_table_forwards_only_pushes_sent_before_a_switch() -> None:
    # server[2] owns "d" on ring [0, 1, 2] (copy on 0); server[3] joins: the copies go to 2
    # and 3. 2 keeps its table and sends 3 the copy, then the final with the buffered sync
    # pushes that came before each worker's switch: worker[0] switched with none buffered, so
    # its later push of clock 5 (which 3 gets from the worker itself) is not forwarded
    state = ServerState()
    state.rank, state.name, state.replication = 2, "server[2]", 2
    spec = TableSpec(name="d", kind="dense", shape=(8,), seed=1, consistency="sync")
    spec = spec.with_ranges([(2, 0, 8)])
    t = make_table(spec, 2, [0, 1, 2], 2)
    state.tables["d"] = t
    sent: list[tuple[int, str, dict[str, object], list[np.ndarray]]] = []

    def send(dest: int, table: str, phase: str, extra: dict[str, object],
             arrays: list[np.ndarray]) -> None:  # fmt: skip
        sent.append((dest, phase, extra, arrays))

    moves = DenseMoves(state)
    moves.start({"d": [[2, 0, 8]]}, send, ([0, 1, 2], [0, 1, 2, 3]))
    assert state.tables["d"] is t and not moves.receiving  # kept, not re-made
    assert [(d, p) for d, p, _, _ in sent] == [(3, "copy")]
    assert t.sync is not None
    t.sync.add(5, (1, np.full(8, 1.0, np.float32)))  # worker[1], not switched
    t.sync.add(5, (0, np.full(8, 2.0, np.float32)))  # worker[0], after its switch
    moves.finish(send, {0: {}})
    dest, phase, extra, arrays = sent[-1]
    assert (dest, phase, extra["sync"]) == (3, "final", [[5, 1, 8]])
    np.testing.assert_array_equal(arrays[3], np.full(8, 1.0, np.float32))
    moves.settle()
    assert state.tables["d"] is t and t.spec.ranges == ((2, 0, 8),) and t.other_ranges == ()
