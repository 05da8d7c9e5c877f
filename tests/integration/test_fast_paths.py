"""The fast paths (same-host shared memory, TCP receive buffers, key caching) give the same
results as plain NumPy, fall back safely, and leave nothing behind."""

from __future__ import annotations

import gc
import os
from typing import Any

import msgpack
import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import RemoteError
from paramserver.wire import shm
from paramserver.wire.transport import Future, _Pending
from tests.timing import FAST

pytestmark = pytest.mark.timeout(90)

N = 300_000  # above the split threshold: one range per server, several 1 MiB frames each


def _our_segments() -> list[str]:
    return [f for f in os.listdir(shm.SHM_DIR) if f.startswith(f"{shm.PREFIX}{os.getpid()}-")]


@pytest.mark.parametrize("transport", ["auto", "tcp"])
@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
def test_dense_paths_match_numpy(cluster: ps.LocalCluster, transport: str, opt: str) -> None:
    client = cluster.connect(transport=transport)
    optimizer = (
        ps.optim.SGD(lr=0.5) if opt == "sgd" else ps.optim.Adagrad(lr=0.5, initial_accumulator=0.1)
    )
    w = client.dense_table(f"w_{opt}", shape=(N,), init=ps.init.Constant(1.0), optimizer=optimizer)
    assert w.shared_memory == (transport == "auto" and os.path.isdir(shm.SHM_DIR))
    assert _our_segments() == []  # unlinked as soon as the servers mapped it
    rng = np.random.default_rng(1)
    ref = np.ones(N, np.float32)
    acc = np.full(N, 0.1, np.float32)  # Adagrad's initial accumulator
    out = np.empty(N, np.float32)
    for step in range(4):
        g = rng.standard_normal(N).astype(np.float32)
        if step % 2:
            buf = w.push_buffer()
            buf[:] = g
            w.push(buf).result()
        else:
            w.push(g).result()
        if opt == "sgd":
            ref = ref - np.float32(0.5) * g
        else:
            acc = acc + g * g
            ref = ref - np.float32(0.5) * g / (np.sqrt(acc) + np.float32(1e-10))
        view = w.pull(copy=False)
        assert not view.flags.writeable
        np.testing.assert_allclose(view, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(w.pull(out=out), view)
        fresh = w.pull()
        assert fresh.flags.writeable
        np.testing.assert_array_equal(fresh, view)


def test_shared_memory_bad_input_changes_nothing(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    w = client.dense_table("w", shape=(N,), init=ps.init.Constant(2.0))
    assert w.shared_memory
    buf = w.push_buffer()
    buf[:] = 1.0
    buf[N - 1] = np.nan
    with pytest.raises(ps.errors.ConfigError, match="NaN or Inf"):
        w.push(buf)
    np.testing.assert_array_equal(w.pull(), np.full(N, 2.0, np.float32))
    # a shared-memory push the worker did not say it checked is scanned by the server
    last = w.spec.ranges[-1][0]  # the server whose range holds the NaN
    fut = client._ep.request(
        f"server[{last}]",
        {"kind": "push", "table": "w", "rank": client.rank, "clock": 0, "seq": 1, "shm": True},
        what="unchecked push",
    )
    with pytest.raises(RemoteError, match="NaN or Inf") as info:
        fut.result(10)
    assert info.value.code == "non_finite"
    # a segment the server cannot map (not ours, wrong nonce, missing) is refused, nothing breaks
    for path in ("/etc/passwd", f"{shm.SHM_DIR}/{shm.PREFIX}1-0123456789abcdef"):
        fut = client._ep.request(
            "server[0]",
            {"kind": "attach", "table": "w", "rank": client.rank, "path": path, "nonce": 1},
            what="attach",
        )
        with pytest.raises(RemoteError, match="cannot map"):
            fut.result(10)
    np.testing.assert_array_equal(w.pull(), np.full(N, 2.0, np.float32))


def test_segment_nonce_and_stale_cleanup() -> None:
    seg = shm.create(1000)
    assert seg is not None
    try:
        with pytest.raises(OSError, match="nonce"):
            shm.attach(seg.path, seg.nonce ^ 1, 1000)
        with pytest.raises(OSError, match="bytes"):
            shm.attach(seg.path, seg.nonce, 100_000)
        other = shm.attach(seg.path, seg.nonce, 1000)
        other.grad[:] = 7
        assert (seg.grad == 7).all()
    finally:
        seg.close()
    assert not os.path.exists(seg.path)
    # a segment of a process that is gone is removed by the next start
    dead = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}999999999-00000000deadbeef")
    with open(dead, "wb") as f:
        f.write(b"x")
    assert shm.cleanup_stale() >= 1
    assert not os.path.exists(dead)


def test_forced_tcp_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PS_TRANSPORT", "tcp")
    from paramserver.config import from_env

    assert from_env().transport == "tcp"
    monkeypatch.setenv("PS_TRANSPORT", "udp")
    with pytest.raises(ps.errors.ConfigError, match="PS_TRANSPORT"):
        from_env()


@pytest.mark.parametrize("distinct", [True, False])
def test_key_caching_matches_numpy(cluster: ps.LocalCluster, distinct: bool) -> None:
    client = cluster.connect()
    emb = client.sparse_table(
        "emb", dim=4, init=ps.init.Constant(1.0), optimizer=ps.optim.SGD(lr=0.25)
    )
    rng = np.random.default_rng(3)
    keys = rng.choice(2**62, size=5000, replace=False).astype(np.uint64)
    if not distinct:
        keys[:1000] = keys[1000:2000]
    ref = {int(k): np.ones(4, np.float32) for k in keys}
    for step in range(6):
        g = rng.standard_normal((len(keys), 4)).astype(np.float32)
        emb.push(keys, g).result()
        summed: dict[int, np.ndarray] = {}
        for k, gi in zip(keys.tolist(), g, strict=True):
            summed[k] = summed[k] + gi if k in summed else gi.copy()
        for k, gi in summed.items():
            ref[k] = ref[k] - np.float32(0.25) * gi
        rows = emb.pull(keys)
        np.testing.assert_allclose(rows, np.stack([ref[int(k)] for k in keys]), rtol=1e-6)
        if step == 3:  # by now the list is cached: the servers only get its signature
            plan = next(iter(emb._plans.values()))
            assert plan.sig is not None and plan.known
            # a server that forgot the list (restart, eviction) makes the worker resend it
            plan.sig = plan.sig ^ 1
    # the caller may reuse its key array: the cache holds its own copy
    keys[:] = keys[::-1]
    rows = emb.pull(keys)
    np.testing.assert_allclose(rows, np.stack([ref[int(k)] for k in keys]), rtol=1e-6)
    assert sum(s["tables"]["emb"]["rows"] for s in client.stats()) == len(ref)


def test_unknown_signature_is_refused_and_changes_nothing(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    client.sparse_table("emb", dim=2, init=ps.init.Constant(1.0))
    grads = np.ones((3, 2), np.float32)
    for s in range(client.num_servers):
        fut = client._ep.request(
            f"server[{s}]",
            {
                "kind": "push",
                "table": "emb",
                "rank": client.rank,
                "clock": 0,
                "seq": 1,
                "sig": 12345,
            },
            [grads],
            what="push",
        )
        with pytest.raises(RemoteError, match="send the keys again") as info:
            fut.result(10)
        assert info.value.code == "unknown_sig"
    assert sum(s["tables"]["emb"]["rows"] for s in client.stats()) == 0


def test_push_after_a_prefetched_pull_reuses_the_dedup(
    cluster: ps.LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pull(A), pull(B), push(A), push(B): the pushes reuse the pulls' dedup and still match
    NumPy (the order of a training loop that prefetches the next batch)."""
    from paramserver.client import keyplan as sparse_module

    client = cluster.connect()
    emb = client.sparse_table("pre", dim=2, optimizer=ps.optim.SGD(lr=1.0))
    rng = np.random.default_rng(5)
    ref: dict[int, np.ndarray] = {}
    calls = []
    real_unique = sparse_module.unique_inverse
    monkeypatch.setattr(
        sparse_module, "unique_inverse", lambda flat: calls.append(1) or real_unique(flat)
    )
    lists = [rng.integers(0, 50, size=40).astype(np.uint64) for _ in range(6)]
    fut = emb.pull_async(lists[0])
    for i, keys in enumerate(lists):
        rows = fut.result()
        for j, k in enumerate(keys.tolist()):
            np.testing.assert_array_equal(rows[j], ref.get(k, np.zeros(2, np.float32)))
        if i + 1 < len(lists):
            fut = emb.pull_async(lists[i + 1])  # sent before this batch's push
        before = len(calls)
        grads = rng.standard_normal((40, 2)).astype(np.float32)
        emb.push(keys, grads).result()
        assert len(calls) == before, "the push recomputed the dedup of its key list"
        summed: dict[int, np.ndarray] = {}  # repeated keys are summed, then applied
        for k, g in zip(keys.tolist(), grads, strict=True):
            summed[k] = summed[k] + g if k in summed else g.copy()
        for k, g in summed.items():
            ref[k] = ref.get(k, np.zeros(2, np.float32)) - g
        if i + 1 < len(lists):  # the prefetched rows missed this push: pull them fresh
            fut = emb.pull_async(lists[i + 1])
    assert calls, "the pulls never deduplicated their key lists"


def _slot_requests(client: ps.Client) -> int:
    return sum(pool.used for _, pool in client._slot_pools.values())


@pytest.mark.parametrize("transport", ["auto", "tcp"])
@pytest.mark.parametrize("consistency", ["async", "sync"])
@pytest.mark.parametrize("codec", ["none", "bfloat16"])
def test_sparse_slots_match_numpy(
    cluster: ps.LocalCluster, transport: str, consistency: str, codec: str
) -> None:
    """Pulls and pushes large enough for shared-memory slots (first sends with keys, then
    signatures; repeated keys; two servers) give NumPy's answer, in sync mode too where pulls
    wait for the clock and are answered into their slot later."""
    client = cluster.connect(transport=transport)
    dim = 8
    emb = client.sparse_table(
        "emb",
        dim=dim,
        init=ps.init.Constant(0.5),
        optimizer=ps.optim.SGD(lr=0.125),
        consistency=consistency,
        codec=codec,
        push_codec="none",  # the pulls round; encoded pushes: tests/integration/test_codecs.py
    )
    rng = np.random.default_rng(11)
    pool = rng.choice(2**62, size=30_000, replace=False).astype(np.uint64)
    lists = [pool[rng.integers(0, len(pool), size=24_000)] for _ in range(3)]
    ref = np.full((len(pool), dim), 0.5, np.float32)
    where = {int(k): i for i, k in enumerate(pool.tolist())}
    for step in range(8):
        keys = lists[step % 3]
        at = np.fromiter((where[int(k)] for k in keys.tolist()), np.int64, len(keys))
        rows = emb.pull(keys)
        want = ref[at]
        if codec == "bfloat16":  # rounded to 8 bits of mantissa on the way back
            np.testing.assert_allclose(rows, want, rtol=2**-8)
        else:
            np.testing.assert_array_equal(rows, want)
        grads = rng.standard_normal((len(keys), dim)).astype(np.float32)
        emb.push(keys, grads).result()
        summed = np.zeros_like(ref)
        np.add.at(summed, at, grads)
        touched = np.unique(at)
        ref[touched] -= np.float32(0.125) * summed[touched]
        client.clock()
    final = emb.pull(pool)
    np.testing.assert_allclose(final, ref, rtol=2**-8 if codec == "bfloat16" else 1e-6)
    if transport == "tcp" or not os.path.isdir(shm.SHM_DIR):
        assert _slot_requests(client) == 0
    else:
        assert _slot_requests(client) >= 8  # most of them went through the slots
    assert _our_segments() == []  # every slot was unlinked once its server mapped it


def test_slot_bad_input_changes_nothing(cluster: ps.LocalCluster) -> None:
    from paramserver.wire import protocol

    client = cluster.connect()
    emb = client.sparse_table("emb", dim=4, init=ps.init.Constant(1.0))
    keys = np.arange(20_000, dtype=np.uint64)
    grads = np.ones((len(keys), 4), np.float32)
    push = {"kind": "push", "table": "emb", "rank": client.rank, "clock": 0, "seq": 1}
    # a slot that was never attached: refused with the request's id, nothing applied
    fake = np.zeros(1 << 20, np.uint8)
    fut = client._ep.request(
        "server[0]", {**push, "slot": 3, "reply_at": 0}, [keys, grads], what="push", region=fake
    )
    with pytest.raises(RemoteError, match="no such slot") as info:
        fut.result(10)
    assert info.value.code == "no_slot"
    # a segment the server cannot map is refused
    for path in ("/etc/passwd", f"{shm.SHM_DIR}/{shm.PREFIX}1-0123456789abcdef"):
        fut = client._ep.request(
            "server[0]",
            {
                "kind": "attach_slot",
                "rank": client.rank,
                "slot": 0,
                "path": path,
                "nonce": 1,
                "size": 1 << 20,
            },
            what="attach_slot",
        )
        with pytest.raises(RemoteError, match="cannot map"):
            fut.result(10)
    # an attached slot, but an array said to lie outside it
    seg = shm.create(1 << 20, regions=1)
    assert seg is not None
    try:
        client._ep.request(
            "server[0]",
            {
                "kind": "attach_slot",
                "rank": client.rank,
                "slot": 5,
                "path": seg.path,
                "nonce": seg.nonce,
                "size": 1 << 20,
            },
            what="attach_slot",
        ).result(10)
        rid = 1 << 40  # not an id the endpoint hands out
        frames = protocol.encode({**push, "slot": 5, "id": rid}, [keys])
        header = protocol.decode_header(frames[0])
        header["arrays"] = [["uint64", [len(keys)], 0, (1 << 20) - 8]]
        frames = [msgpack.packb(header), *frames[2:]]
        peer = client._ep.peers["server[0]"]
        fut: Future[Any] = Future(client._ep, "bad offset")
        peer.pending[rid] = _Pending(fut, None, None)
        peer.socket.send_multipart(frames)
        with pytest.raises(RemoteError, match="not inside") as info:
            fut.result(10)
        assert info.value.code == "protocol"
    finally:
        seg.close()
    assert sum(s["tables"]["emb"]["rows"] for s in client.stats()) == 0
    np.testing.assert_array_equal(emb.pull(keys[:5]), np.ones((5, 4), np.float32))


def test_a_deferred_sync_pull_is_answered_into_its_slot() -> None:
    """Under sync, a worker's pull for the next clock waits on the servers until the slow
    worker's push of this clock is applied; the answer, written into the pull's slot later,
    holds both workers' updates."""
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST) as cluster:
        fast, slow = (
            cluster.connect(rank=0, transport="auto"),
            cluster.connect(rank=1, transport="auto"),
        )
        keys = np.arange(20_000, dtype=np.uint64)  # 640 KiB of rows per server
        spec = {"dim": 16, "init": ps.init.Constant(1.0), "consistency": "sync"}
        a = fast.sparse_table("emb", optimizer=ps.optim.SGD(lr=1.0), **spec)
        b = slow.sparse_table("emb", optimizer=ps.optim.SGD(lr=1.0), **spec)
        for _ in range(3):  # slots are attached in the background: let them be
            a.pull(keys)
        a.push(keys, np.full((len(keys), 16), 0.25, np.float32)).result()
        fast.clock()
        waiting = a.pull_async(keys)  # clock 1: needs the slow worker's clock 0
        fast._ep.poll(0.3)
        assert not waiting.done()
        b.push(keys, np.full((len(keys), 16), 0.75, np.float32)).result()
        slow.clock()
        rows = waiting.result(30)
        # sync applies the workers' mean gradient: 1 - (0.25 + 0.75) / 2
        np.testing.assert_array_equal(rows, np.full((len(keys), 16), 0.5, np.float32))
        assert _slot_requests(fast) >= 4


def test_a_server_that_cannot_map_slots_gets_frames(
    cluster: ps.LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a server on another host would: it refuses the first slot, the worker stops asking
    and every request goes in frames, with the same answers."""
    from paramserver.wire import slots

    create = shm.create

    def elsewhere(nbytes: int, regions: int = 2) -> shm.Segment | None:
        seg = create(nbytes, regions)
        if seg is not None:
            seg.unlink()  # the server finds no such file, as on another host
        return seg

    monkeypatch.setattr(slots.shm, "create", elsewhere)
    client = cluster.connect()
    emb = client.sparse_table(
        "emb", dim=8, init=ps.init.Constant(1.0), optimizer=ps.optim.SGD(lr=1.0)
    )
    keys = np.arange(50_000, dtype=np.uint64)
    for _ in range(4):
        emb.push(keys, np.ones((len(keys), 8), np.float32)).result()
    np.testing.assert_array_equal(emb.pull(keys), np.full((len(keys), 8), -3.0, np.float32))
    pools = [pool for _, pool in client._slot_pools.values()]
    assert pools and all(p.refused and not p.slots and p.used == 0 for p in pools)


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_held_results_never_change_while_later_pulls_reuse_memory(
    cluster: ps.LocalCluster, transport: str
) -> None:
    """Pull results come from memory of earlier results that nothing holds any more: a result
    the caller keeps (or a view of it) keeps its values through later pulls and pushes, and each
    pull's rows are NumPy's, with repeated keys, over both servers, sparse and dense."""
    client = cluster.connect(transport=transport)
    dim = 16
    emb = client.sparse_table(
        "held", dim=dim, init=ps.init.Constant(0.0), optimizer=ps.optim.SGD(lr=1.0)
    )
    dense = client.dense_table(
        "held_w", shape=(N,), init=ps.init.Constant(0.0), optimizer=ps.optim.SGD(lr=1.0)
    )
    rng = np.random.default_rng(21)
    ref = np.zeros((5_000, dim), np.float32)
    w_ref = np.zeros(N, np.float32)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for step in range(8):
        at = rng.integers(0, len(ref), size=40_000)  # 2.5 MB of rows: from the pool
        rows = emb.pull(at.astype(np.uint64))
        np.testing.assert_array_equal(rows, ref[at])
        w = dense.pull()
        np.testing.assert_array_equal(w, w_ref)
        if step % 3 == 0:  # held by the caller: a view, and the whole dense result
            kept.append((rows[::7], ref[at][::7].copy()))
            kept.append((w, w_ref.copy()))
        grads = rng.standard_normal((len(at), dim)).astype(np.float32)
        emb.push(at.astype(np.uint64), grads).result()
        summed = np.zeros_like(ref)
        np.add.at(summed, at, grads)  # repeated keys summed first, then one update
        ref -= summed
        g = rng.standard_normal(N).astype(np.float32)
        dense.push(g).result()
        w_ref -= g
        if step % 3:
            rows[:] = np.nan  # the caller's to scribble on
    for got, want in kept:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_a_dropped_result_is_reused_without_the_garbage_collector(
    cluster: ps.LocalCluster, transport: str
) -> None:
    """Nothing of a finished request holds its result: once the caller drops a pull's result,
    the next pull of the same size gets that memory back (already mapped) at once, not after a
    garbage collection, sparse and dense; the values are NumPy's."""
    client = cluster.connect(transport=transport)
    emb = client.sparse_table("dropped", dim=16, init=ps.init.Constant(0.5))
    dense = client.dense_table("dropped_w", shape=(N,), init=ps.init.Constant(0.25))
    keys = np.arange(40_000, dtype=np.uint64)  # 2.5 MB of rows: from the pool
    emb.pull(keys)  # the tables made on every server, so that no reply differs from the next
    dense.pull()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for pull, want in ((lambda: emb.pull(keys), 0.5), (dense.pull, 0.25)):
            first = pull()
            at = first.ctypes.data
            del first
            again = pull()
            assert again.ctypes.data == at, "the dropped result's memory was not reused"
            np.testing.assert_array_equal(again, np.full_like(again, want))
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_a_long_list_sent_before_its_dedup_matches_numpy(transport: str) -> None:
    """One server: a long list that looks distinct goes before its dedup (which the push then
    reuses), a repeat the sample of its keys missed included; rows and updates match NumPy."""
    from paramserver.client.keyplan import AS_IS_KEYS, SAMPLE_KEYS

    with ps.LocalCluster(servers=1, workers=1, timeouts=FAST) as c:
        client = c.connect(transport=transport)
        emb = client.sparse_table("early", dim=4, init=ps.init.Constant(0.5))
        rng = np.random.default_rng(8)
        n = AS_IS_KEYS + 7_000
        keys = rng.choice(2**62, size=n, replace=False).astype(np.uint64)
        step = n // SAMPLE_KEYS
        keys[step + 1] = keys[n - 2]  # a repeat between the sampled positions
        ref: dict[int, np.ndarray] = {}
        for _ in range(2):
            rows = emb.pull(keys)
            want = np.stack([ref.get(k, np.full(4, 0.5, np.float32)) for k in keys.tolist()])
            np.testing.assert_array_equal(rows, want)
            grads = rng.standard_normal((n, 4)).astype(np.float32)
            emb.push(keys, grads).result()
            summed: dict[int, np.ndarray] = {}
            for k, g in zip(keys.tolist(), grads, strict=True):
                summed[k] = summed[k] + g if k in summed else g.copy()
            for k, g in summed.items():
                ref[k] = ref.get(k, np.full(4, 0.5, np.float32)) - np.float32(0.01) * g
            keys = rng.permutation(keys)  # a fresh order: a list not seen before
        moved = emb.traffic()
        # the pulls sent every key (the repeat too); the pushes the distinct keys only
        assert moved["rows_pulled"] == 2 * n and moved["rows_pushed"] == 2 * (n - 1)
        assert sum(s["tables"]["early"]["rows"] for s in client.stats()) == n - 1
