"""A plain dense ``pull()`` on one host returns a reply region of the shared segment itself
(no copy on the worker): such a result never changes under its holder, whatever pulls and
pushes come later, a server replaced included; a caller who holds every result gets copies;
a result the caller wrote into is never mistaken for the servers' values; nothing is left in
``/dev/shm``."""

from __future__ import annotations

import gc
import os
import signal

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import RemoteError
from paramserver.wire import shm
from tests.timing import FAST

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.isdir(shm.SHM_DIR), reason="no /dev/shm on this machine"),
]

N = 300_000  # one range per server of the 2-server cluster


def _our_segments() -> list[str]:
    return [f for f in os.listdir(shm.SHM_DIR) if f.startswith(f"{shm.PREFIX}{os.getpid()}-")]


def _in_segment(table: ps.DenseTable, a: np.ndarray) -> bool:
    regions = table._regions
    assert regions is not None
    return any(a.ctypes.data == r.ctypes.data for r in regions.arrays)


def test_held_results_never_change_and_scribbles_never_come_back(
    cluster: ps.LocalCluster,
) -> None:
    client = cluster.connect()
    w = client.dense_table(
        "w", shape=(N,), init=ps.init.Constant(1.0), optimizer=ps.optim.SGD(lr=1.0)
    )
    assert w.shared_memory
    assert _our_segments() == []
    rng = np.random.default_rng(5)
    ref = np.ones(N, np.float32)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    enabled = gc.isenabled()
    gc.disable()  # results are let go of by reference counts alone
    try:
        for step in range(12):
            got = w.pull()
            assert got.flags.writeable
            np.testing.assert_array_equal(got, ref)
            if step in (2, 6):  # held across every later pull and push: the result and a view
                kept.append((got, ref.copy()))
                kept.append((got[::5], ref[::5].copy()))
            g = rng.standard_normal(N).astype(np.float32)
            if step % 2:
                buf = w.push_buffer()
                buf[:] = g
                w.push(buf).result()
            else:
                w.push(g).result()
            ref -= g
            if step % 3 == 1:  # the caller's to scribble on; the next pull must not see it
                got[:] = np.nan
            view = w.pull(copy=False)  # read-only, and held while the next pull goes out
            np.testing.assert_array_equal(view, ref)
            again = w.pull()
            np.testing.assert_array_equal(again, ref)
            again[: N // 2] = -7.0  # scribbled, then dropped: its region comes back dirty
            del view, again
        regions = w._regions
        assert regions is not None
        assert regions.handed > 0, "plain pulls never got a region (always a copy)"
    finally:
        if enabled:
            gc.enable()
    for got, want in kept:
        np.testing.assert_array_equal(got, want)
    assert _our_segments() == []


def test_a_training_loop_holding_one_result_gets_regions_not_copies(
    cluster: ps.LocalCluster,
) -> None:
    client = cluster.connect()
    w = client.dense_table(
        "w", shape=(N,), init=ps.init.Constant(0.0), optimizer=ps.optim.SGD(lr=0.5)
    )
    values = w.pull()
    for step in range(6):
        w.push(np.full(N, 2.0, np.float32))
        values = w.pull()  # the last result is held while this one is pulled
        np.testing.assert_array_equal(values, np.full(N, -1.0 - step, np.float32))
        assert _in_segment(w, values)
    assert w._regions is not None and w._regions.handed == 7


def test_a_caller_who_holds_every_result_gets_copies(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    w = client.dense_table(
        "w", shape=(N,), init=ps.init.Constant(0.0), optimizer=ps.optim.SGD(lr=1.0)
    )
    held: list[tuple[np.ndarray, float]] = []
    for step in range(8):
        held.append((w.pull(), -float(step)))
        w.push(np.ones(N, np.float32)).result()
    in_segment = [a for a, _ in held if _in_segment(w, a)]
    # one region is always kept back: the rest of the results are copies, not new segments
    assert 1 <= len(in_segment) < len(w._regions.arrays)  # type: ignore[union-attr]
    assert _our_segments() == []
    for a, want in held:
        np.testing.assert_array_equal(a, np.full(N, want, np.float32))
    # pulls still work (and see every push) with every region held, in flight or not
    futs = [w.pull_async() for _ in range(4)]
    views = [w.pull(copy=False) for _ in range(2)]
    for f in futs:
        np.testing.assert_array_equal(f.result(30), np.full(N, -8.0, np.float32))
    for v in views:
        np.testing.assert_array_equal(v, np.full(N, -8.0, np.float32))


def test_pulls_in_flight_around_a_push_keep_their_own_values(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    w = client.dense_table(
        "w", shape=(N,), init=ps.init.Constant(3.0), optimizer=ps.optim.SGD(lr=1.0)
    )
    before = w.pull_async()
    w.push(np.ones(N, np.float32))  # its new values go to a region no pull in flight names
    after = w.pull_async()
    w.push(np.ones(N, np.float32)).result()
    last = w.pull()
    np.testing.assert_array_equal(before.result(30), np.full(N, 3.0, np.float32))
    np.testing.assert_array_equal(after.result(30), np.full(N, 2.0, np.float32))
    np.testing.assert_array_equal(last, np.full(N, 1.0, np.float32))


def test_a_region_out_of_range_is_refused_and_changes_nothing(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    w = client.dense_table("w", shape=(N,), init=ps.init.Constant(2.0))
    assert w.shared_memory
    for kind in ("pull", "push"):
        header = {"kind": kind, "table": "w", "rank": client.rank, "clock": 0, "shm": True,
                  "region": 5}  # fmt: skip
        header.update({"seq": 1, "checked": True} if kind == "push" else
                      {"create": True, "timeout": 5.0})  # fmt: skip
        fut = client._ep.request("server[0]", header, what=f"{kind} into region 5")
        with pytest.raises(RemoteError, match="reply region 5"):
            fut.result(10)
    np.testing.assert_array_equal(w.pull(), np.full(N, 2.0, np.float32))


def test_results_held_across_a_replaced_server() -> None:
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST) as cluster:
        client = cluster.connect()
        reference = cluster.connect(transport="tcp")  # another worker, reading over TCP
        w = client.dense_table(
            "w", shape=(N,), init=ps.init.Constant(1.0), optimizer=ps.optim.SGD(lr=1.0)
        )
        tcp = reference.dense_table(
            "w", shape=(N,), init=ps.init.Constant(1.0), optimizer=ps.optim.SGD(lr=1.0)
        )
        assert w.shared_memory and not tcp.shared_memory
        w.push(np.ones(N, np.float32)).result()
        first = w.pull()
        np.testing.assert_array_equal(first, np.zeros(N, np.float32))
        os.kill(client.stats()[1]["pid"], signal.SIGKILL)
        # the replacement (no checkpoint: its range starts again) answers by TCP into a region
        second = w.pull(timeout=30)
        assert client.replaced[1] == 1
        w.push(np.ones(N, np.float32)).result()
        third = w.pull()
        np.testing.assert_array_equal(third, second - 1.0)
        np.testing.assert_array_equal(third, tcp.pull())
        np.testing.assert_array_equal(first, np.zeros(N, np.float32))
        np.testing.assert_array_equal(second, third + 1.0)
    assert _our_segments() == []


def test_a_plain_push_with_nan_is_refused_in_the_copy_and_changes_nothing(
    cluster: ps.LocalCluster,
) -> None:
    client = cluster.connect()
    w = client.dense_table(
        "w", shape=(N,), init=ps.init.Constant(2.0), optimizer=ps.optim.SGD(lr=1.0)
    )
    assert w.shared_memory
    for bad in (np.nan, np.inf, -np.inf):
        g = np.ones(N, np.float32)
        g[N // 3] = bad  # in the first half: the helper thread's part of the copy
        with pytest.raises(ps.errors.ConfigError, match="NaN or Inf"):
            w.push(g)
        g[N // 3] = 1.0
        g[-1] = bad
        with pytest.raises(ps.errors.ConfigError, match="NaN or Inf"):
            w.push(g)
    np.testing.assert_array_equal(w.pull(), np.full(N, 2.0, np.float32))
    w.push(np.ones(N, np.float32)).result()
    np.testing.assert_array_equal(w.pull(), np.full(N, 1.0, np.float32))
    skip = client.dense_table(
        "s", shape=(N,), init=ps.init.Constant(2.0), nonfinite="skip",
        optimizer=ps.optim.SGD(lr=1.0),
    )  # fmt: skip
    g = np.ones(N, np.float32)
    g[5] = np.nan
    skip.push(g).result()  # the server whose range holds the NaN skips its part whole
    want = np.full(N, 1.0, np.float32)
    for _, lo, hi in skip.spec.ranges:
        if lo <= 5 < hi:
            want[lo:hi] = 2.0
    np.testing.assert_array_equal(skip.pull(), want)


def test_large_tables_take_the_streamed_copies_and_match_numpy() -> None:
    """Tables large enough for streaming stores (paramserver/nontemporal.py) on every path:
    the worker's copy of a plain push, the server's SGD into a region and its copy into one
    (a pull after another region was written), copies out of the regions; ranges that do not
    start on a cache line; NaN in the second half of the copy refused with nothing changed."""
    with ps.LocalCluster(servers=2, workers=2, timeouts=FAST) as cluster:
        streamed_copies(cluster)


def streamed_copies(cluster: ps.LocalCluster) -> None:
    n = 6_000_011  # 24 MiB: each server's range split in halves of more than 4 MiB
    client = cluster.connect()
    lr = np.float32(0.5)
    w = client.dense_table(
        "big", shape=(n,), init=ps.init.Constant(1.0), optimizer=ps.optim.SGD(lr=0.5)
    )
    assert w.shared_memory and any(lo % 16 for _, lo, _ in w.spec.ranges)
    rng = np.random.default_rng(9)
    ref = np.ones(n, np.float32)
    held = []
    for step in range(5):
        g = rng.standard_normal(n).astype(np.float32)
        w.push(g).result()
        ref = ref - lr * g  # NumPy rounds as the server's kernel must: bit for bit
        got = w.pull()
        assert got.tobytes() == ref.tobytes(), f"step {step}"
        held.append((got, ref))  # every result held: later pulls are copies out of a region
        out = np.empty(n, np.float32)
        assert w.pull(out=out) is out and out.tobytes() == ref.tobytes()
    for a, want in held:
        assert a.tobytes() == want.tobytes(), "a held result changed"
    g = np.ones(n, np.float32)
    g[n - n // 5] = np.nan  # in the second half of the worker's copy
    with pytest.raises(ps.errors.ConfigError, match="NaN or Inf"):
        w.push(g)
    assert w.pull().tobytes() == ref.tobytes()
    # another worker's push: this one's next pull has the server copy into its region
    other = cluster.connect().dense_table(
        "big", shape=(n,), init=ps.init.Constant(1.0), optimizer=ps.optim.SGD(lr=0.5)
    )
    other.push(np.full(n, 2.0, np.float32)).result()
    assert w.pull().tobytes() == (ref - lr * np.float32(2.0)).tobytes()
