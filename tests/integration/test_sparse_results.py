"""A plain sparse ``pull()`` of distinct keys from one server on this host returns the rows
where the server gathered them, in the request's shared slot (no copy on the worker): such a
result, and every view of it, never changes under its holder, whatever pulls and pushes come
later, a replaced server included; a caller who holds every result gets copies and the slots
stay bounded; repeated keys and two servers are answered as before (copies); nothing is left
in ``/dev/shm``."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator

import numpy as np
import pytest

import paramserver as ps
from paramserver.wire import shm
from paramserver.wire.slots import SLOTS_PER_SERVER
from tests.timing import FAST

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.isdir(shm.SHM_DIR), reason="no /dev/shm on this machine"),
]

DIM = 16
POOL = 60_000  # distinct keys of the table
N = 40_000  # keys per pull: 2.5 MB of rows, a slot's size


@pytest.fixture
def one_server() -> Iterator[ps.LocalCluster]:
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST) as c:
        yield c


def _our_segments() -> list[str]:
    return [f for f in os.listdir(shm.SHM_DIR) if f.startswith(f"{shm.PREFIX}{os.getpid()}-")]


def _lent(client: ps.Client, a: np.ndarray) -> bool:
    """Whether ``a`` is a view of one of the worker's shared slots (a result handed out)."""
    return any(
        a.base is slot.region
        for _, pool in client._slot_pools.values()
        for slot in pool.slots.values()
    )


def _slots(client: ps.Client) -> int:
    return sum(len(pool.slots) for _, pool in client._slot_pools.values())


class Reference:
    """The table's rows as NumPy computes them: Constant(0) init, SGD with lr 1."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.keys = self.rng.choice(2**62, size=POOL, replace=False).astype(np.uint64)
        self.rows = np.zeros((POOL, DIM), np.float32)

    def distinct(self, n: int = N) -> np.ndarray:
        return self.rng.permutation(POOL)[:n]

    def push(self, table: ps.SparseTable, at: np.ndarray) -> None:
        grads = self.rng.standard_normal((len(at), DIM)).astype(np.float32)
        table.push(self.keys[at], grads).result()
        summed = np.zeros_like(self.rows)
        np.add.at(summed, at, grads)  # repeated keys summed first, then one update
        self.rows -= summed


def _table(client: ps.Client, name: str = "emb") -> ps.SparseTable:
    return client.sparse_table(
        name, dim=DIM, init=ps.init.Constant(0.0), optimizer=ps.optim.SGD(lr=1.0)
    )


def test_held_results_never_change_and_scribbles_never_come_back(
    one_server: ps.LocalCluster,
) -> None:
    client = one_server.connect()
    emb = _table(client)
    ref = Reference(3)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    lent = 0
    enabled = gc.isenabled()
    gc.disable()  # results are let go of by reference counts alone
    try:
        for step in range(14):
            at = ref.distinct()
            rows = emb.pull(ref.keys[at])
            assert rows.flags.writeable
            np.testing.assert_array_equal(rows, ref.rows[at])
            lent += _lent(client, rows)
            if step in (3, 8):  # held across every later pull and push: the result and a view
                kept.append((rows, ref.rows[at].copy()))
                kept.append((rows[::5, 3:], ref.rows[at][::5, 3:].copy()))
            ahead = emb.pull_async(ref.keys[at])  # in flight around a push: its own values
            ref.push(emb, at)
            np.testing.assert_array_equal(ahead.result(30), rows)
            if step % 3 == 1:  # the caller's to scribble on; no later pull may see it
                rows[:] = np.nan
            repeated = ref.rng.integers(0, POOL, size=N)  # repeated keys: expanded, a copy
            got = emb.pull(ref.keys[repeated])
            np.testing.assert_array_equal(got, ref.rows[repeated])
            assert not _lent(client, got)
            del rows, got, ahead
        assert lent >= 10, f"only {lent} of 14 pulls got their slot (no copy)"
    finally:
        if enabled:
            gc.enable()
    for got, want in kept:
        np.testing.assert_array_equal(got, want)
    assert _slots(client) <= SLOTS_PER_SERVER
    assert _our_segments() == []


def test_a_training_loop_holding_one_result_gets_slots_not_copies(
    one_server: ps.LocalCluster,
) -> None:
    client = one_server.connect()
    emb = _table(client)
    ref = Reference(4)
    at = ref.distinct()
    rows = emb.pull(ref.keys[at])
    for step in range(8):
        ref.push(emb, at)
        at = ref.distinct()
        rows = emb.pull(ref.keys[at])  # the last result is held while this one is pulled
        np.testing.assert_array_equal(rows, ref.rows[at])
        if step >= 3:  # once the slots for it are attached
            assert _lent(client, rows), f"step {step}: a copy"


def test_a_caller_who_holds_every_result_gets_copies(one_server: ps.LocalCluster) -> None:
    client = one_server.connect()
    emb = _table(client)
    ref = Reference(5)
    held: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(3 * SLOTS_PER_SERVER):
        at = ref.distinct()
        held.append((emb.pull(ref.keys[at]), ref.rows[at].copy()))
        ref.push(emb, at)
    lent = [a for a, _ in held if _lent(client, a)]
    # one slot is always kept free: the other results are copies, not more shared memory
    assert 1 <= len(lent) < SLOTS_PER_SERVER
    assert _slots(client) <= SLOTS_PER_SERVER
    for a, want in held:
        np.testing.assert_array_equal(a, want)
    # pulls still work (and see every push) with the slots held, in flight or not
    ats = [ref.distinct() for _ in range(4)]
    futs = [emb.pull_async(ref.keys[a]) for a in ats]
    for f, a in zip(futs, ats, strict=True):
        np.testing.assert_array_equal(f.result(30), ref.rows[a])
    for a, want in held:
        np.testing.assert_array_equal(a, want)
    assert _our_segments() == []


def test_results_held_across_a_replaced_server() -> None:
    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST) as cluster:
        client = cluster.connect()
        emb = _table(client)
        ref = Reference(6)
        held: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(4):
            at = ref.distinct()
            held.append((emb.pull(ref.keys[at]), ref.rows[at].copy()))
            ref.push(emb, at)
        assert any(_lent(client, a) for a, _ in held)
        os.kill(client.stats()[0]["pid"], signal.SIGKILL)
        # the replacement (no checkpoint) starts its rows afresh, in slots of its own
        ref.rows[:] = 0.0
        at = ref.distinct()
        np.testing.assert_array_equal(emb.pull(ref.keys[at], timeout=30), ref.rows[at])
        assert client.replaced[0] == 1
        for _ in range(4):
            ref.push(emb, at)
            at = ref.distinct()
            rows = emb.pull(ref.keys[at])
            np.testing.assert_array_equal(rows, ref.rows[at])
        assert _lent(client, rows)
        for a, want in held:
            np.testing.assert_array_equal(a, want)
    assert _our_segments() == []


def test_two_servers_answer_into_copies(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    emb = _table(client)
    ref = Reference(7)
    kept = []
    for _ in range(4):
        at = ref.distinct()
        rows = emb.pull(ref.keys[at])
        np.testing.assert_array_equal(rows, ref.rows[at])
        assert not _lent(client, rows)  # each server's rows placed where the list wants them
        kept.append((rows, ref.rows[at].copy()))
        ref.push(emb, at)
    for a, want in kept:
        np.testing.assert_array_equal(a, want)


def test_no_room_in_dev_shm_for_a_spare_slot_keeps_the_slots(
    one_server: ps.LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``/dev/shm`` has room for one slot and no more (a small container), the slot
    keeps carrying requests and results are copies (not frames for everything after)."""
    from paramserver.wire import slots

    create = shm.create
    made: list[int] = []

    def one_only(nbytes: int, regions: int = 2) -> shm.Segment | None:
        if made:
            return None  # as a full /dev/shm answers
        made.append(nbytes)
        return create(nbytes, regions)

    monkeypatch.setattr(slots.shm, "create", one_only)
    client = one_server.connect()
    emb = _table(client)
    ref = Reference(8)
    for _ in range(6):
        at = ref.distinct()
        rows = emb.pull(ref.keys[at])
        np.testing.assert_array_equal(rows, ref.rows[at])
        assert not _lent(client, rows)
        ref.push(emb, at)
    (_, pool), *_ = client._slot_pools.values()
    assert len(made) == 1 and pool.full and not pool.refused
    assert pool.used >= 8  # the pulls and pushes after the first kept going in the slot


def test_repeated_keys_are_summed_into_the_slot_that_carries_them(
    one_server: ps.LocalCluster,
) -> None:
    """A push with repeated keys to one server on this host sums them straight into a free
    slot, where its request carries them (the worker's own sum buffer is not used once the
    slots are attached): the table matches NumPy, with the key list's signature and when the
    server forgot it (the retry sends the keys in front of the sum, which stays put)."""
    client = one_server.connect()
    emb = _table(client)
    ref = Reference(6)
    at = ref.rng.integers(0, POOL, size=N)  # about 29,000 distinct keys, repeated
    for step in range(8):
        ref.push(emb, at)
        np.testing.assert_array_equal(emb.pull(ref.keys[at]), ref.rows[at])
        if step == 2:  # the slots are attached by now: no push needs the buffer again
            emb._sum_buf = None
        if step == 4:  # the list is cached: a server that forgot it makes the worker resend
            plan = next(iter(emb._plans.values()))
            assert plan.sig is not None and plan.known
            plan.sig ^= 1
    assert emb._sum_buf is None, "a push summed its gradient outside the slots"
    assert _slots(client) <= SLOTS_PER_SERVER
    del emb
    gc.collect()
    assert _our_segments() == []
