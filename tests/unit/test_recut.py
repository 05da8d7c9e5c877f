"""The pure parts of a dense table cut anew by a move: runs of changed elements and their
positions, a shard's ranges exported and loaded, and buffered sync pushes cut into parts that
sum bit for bit as the whole pushes did (checked against NumPy and the uncut aggregation)."""

from __future__ import annotations

import numpy as np

from paramserver.init import Normal
from paramserver.optim import Adam
from paramserver.partition import dense_pieces, dense_ranges
from paramserver.server.consistency import SyncBuffer, aggregate_dense
from paramserver.server.recut import element_runs, run_positions, sync_parts
from paramserver.server.shard import DenseShard
from paramserver.server.table import Table


def test_runs_of_changed_elements_give_back_exactly_their_positions() -> None:
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 1000):
        changed = rng.random(n) < 0.4
        runs = element_runs(changed, 100)
        assert runs.dtype == np.int64 and runs.shape == (len(runs), 2)
        np.testing.assert_array_equal(run_positions(runs), np.flatnonzero(changed) + 100)
    np.testing.assert_array_equal(element_runs(np.ones(5, bool)), [[0, 5]])


def test_a_shards_range_exported_and_loaded_elsewhere_is_the_same_bits() -> None:
    # a whole table and the same table cut in two: a part exported from one and loaded at its
    # positions in another (Adam: state planes and its step, a scalar) is bit for bit the same
    whole = DenseShard(100, "float32", Normal(), Adam(lr=0.1), seed=5)
    rng = np.random.default_rng(2)
    for _ in range(3):
        whole.push(rng.standard_normal(100).astype(np.float32))
    right = DenseShard(60, "float32", Normal(), Adam(lr=0.1), seed=5, offset=40)
    right.load_at(np.arange(60), whole.export(40, 100)["rows"])
    assert right.export()["rows"].tobytes() == whole.export(40, 100)["rows"].tobytes()
    g = rng.standard_normal(100).astype(np.float32)
    whole.push(g)
    right.push(g[40:])
    assert right.pull().tobytes() == whole.pull()[40:].tobytes()


def test_buffered_pushes_cut_into_parts_sum_as_the_whole_pushes_did() -> None:
    # two workers, two pushes each, over a table of 30 elements cut over two servers; after a
    # re-cut over three, each new range's pushes are the old owners' parts: aggregated, every
    # element is bitwise the one of the uncut aggregation (-0.0 included)
    rng = np.random.default_rng(3)
    size = 30
    pushes = [(r, rng.standard_normal(size).astype(np.float32)) for r in (1, 0, 0, 1)]
    pushes[0][1][4] = -0.0
    want = aggregate_dense([(r, g.copy()) for r, g in pushes], 2)
    old, new = dense_ranges("t", size, [0, 1], split_at=2), dense_ranges("t", size, [0, 1, 2], 2)
    held = {}
    for s, a, b in old:  # each old owner's table with its buffered pushes
        t = Table(None, None, a, b, SyncBuffer("dense"))  # type: ignore[arg-type]
        assert t.sync is not None
        for r, g in pushes:
            t.sync.add(7, (r, g[a:b].copy()))
        held[s] = t
    for d, c, e in new:
        items = []
        for s, dest, lo, hi in dense_pieces(old, new) + [
            (s, s, max(a, c), min(b, e)) for s, a, b in old if s == d and max(a, c) < min(b, e)
        ]:
            if dest == d:
                items += [(r, g, start - c) for _, r, start, g in sync_parts(held[s], lo, hi)]
        got = aggregate_dense(items, 2, e - c)
        assert got.tobytes() == want[c:e].tobytes()
