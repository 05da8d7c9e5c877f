"""SparseShard's large requests as two halves on two threads, and its room made ahead of need
between requests (prepare): the same rows, states and row ids as one pass, bit for bit (every
row written by one half only, or to the same values)."""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps
from paramserver import parallel
from paramserver.server.shard import SparseShard
from paramserver.server.shard import sparse as sparse_shard


def _split(split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPLIT_ROWS_BYTES", "SPLIT_INIT_BYTES", "SPLIT_KEYS_BYTES"):
        monkeypatch.setattr(sparse_shard, name, 1 if split else 1 << 62)


def _run(split: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    _split(split, monkeypatch)
    rng = np.random.default_rng(3)
    shard = SparseShard(16, "float32", ps.init.Normal(std=0.1), ps.optim.Adagrad(lr=0.1), seed=9)
    out: dict[str, np.ndarray] = {}
    for step in range(3):
        # repeats inside a request, new keys and known ones
        keys = rng.integers(0, 30_000, 40_000).astype(np.uint64)
        out[f"pull{step}"] = shard.pull(keys)
        out[f"peek{step}"] = shard.pull(keys + np.uint64(10**6), create=False)
        shard.push(keys, rng.standard_normal((len(keys), 16)).astype(np.float32))
    out["again"] = shard.pull(keys[::-1].copy())  # every key found: gathered only
    out.update(shard.export())
    return out


@pytest.mark.parametrize("missing", [sparse_shard.SPLIT_MISSING, 0])
def test_halves_give_what_one_pass_gives(missing: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``missing``: the default (lookups split after a request that found most keys only: the
    first step creates every row, so the second looks up in one pass, the third in halves),
    and 0 (lookups always split, the missing keys inserted in a second pass)."""
    if not parallel.two_cores():
        pytest.skip("one core: requests are never split")
    monkeypatch.setattr(sparse_shard, "SPLIT_MISSING", missing)
    one = _run(False, monkeypatch)
    two = _run(True, monkeypatch)
    assert one.keys() == two.keys()
    for name in one:
        assert one[name].tobytes() == two[name].tobytes(), name


def test_prepare_grows_ahead_and_changes_no_row() -> None:
    rng = np.random.default_rng(4)
    a = SparseShard(8, "float32", ps.init.Normal(std=0.1), ps.optim.Adagrad(lr=0.1), seed=2)
    b = SparseShard(8, "float32", ps.init.Normal(std=0.1), ps.optim.Adagrad(lr=0.1), seed=2)
    for _ in range(12):
        keys = rng.integers(0, 1 << 40, 3_000).astype(np.uint64)
        grads = rng.standard_normal((len(keys), 8)).astype(np.float32)
        np.testing.assert_array_equal(a.pull(keys), b.pull(keys))
        a.push(keys, grads)
        b.push(keys, grads)
        index, capacity = len(a._index), a.capacity
        a.prepare()
        # room made for the next request's keys (twice them, at most twice the rows stored:
        # memory) and a third more rows; a next request of as many new keys always fits
        need = a.num_rows + max(a.num_rows // 3, min(2 * len(keys), a.num_rows))
        assert need >= a.num_rows + len(keys)
        assert 4 * len(a._index) >= need and a.capacity >= need
        assert len(a._index) >= index and a.capacity >= capacity
    ea, eb = a.export(), b.export()
    assert ea["keys"].tobytes() == eb["keys"].tobytes()
    assert ea["rows"].tobytes() == eb["rows"].tobytes()
    np.testing.assert_array_equal(a.contains(ea["keys"]), np.ones(a.num_rows, bool))


@pytest.mark.parametrize("split", [False, True])
def test_pull_writing_new_rows_as_made_and_push_after_it_match_lookups(
    split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull writes each new row's weights into the reply as it initializes it and gathers
    only the rows that existed; a push of the keys it pulled reuses their rows (no lookup).
    The reference takes the other paths: rows resolved, then gathered (every row read back
    from the arena), pushes to rows looked up. Same replies, rows and states, bit for bit;
    also for a push of other keys of the same length after a pull, and of keys equal to the
    pulled ones in another array."""
    _split(split, monkeypatch)
    rng = np.random.default_rng(8)

    def make() -> SparseShard:
        return SparseShard(16, "float32", ps.init.Normal(std=0.1), ps.optim.Adagrad(lr=0.1), seed=4)

    a, b = make(), make()
    for step in range(4):
        keys = rng.integers(0, 20_000, 30_000).astype(np.uint64)  # new, known and repeated
        grads = rng.standard_normal((len(keys), 16)).astype(np.float32)
        got = a.pull(keys)
        rows, dup = b.resolve(keys)
        assert got.tobytes() == b.pull_rows(rows).tobytes()
        if step == 2:  # other keys, as many
            keys = rng.integers(0, 20_000, 30_000).astype(np.uint64)
            rows, dup = b.resolve(keys)
        a.push(keys.copy(), grads)
        b.push_rows(rows, grads, dup)
    ea, eb = a.export(), b.export()
    assert ea["keys"].tobytes() == eb["keys"].tobytes()
    assert ea["rows"].tobytes() == eb["rows"].tobytes()


def test_a_new_key_in_both_halves_is_pulled_with_its_final_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each new key twice, once in each half, at the same place: both halves initialize its
    row at about the same time, and each copies it into the reply. Every copy holds the row's
    final Normal values (those of a one-pass shard), never the other half's interpolated
    first pass (init_normal_row writes a row once)."""
    if not parallel.two_cores():
        pytest.skip("one core: requests are never split")
    rng = np.random.default_rng(5)

    def make() -> SparseShard:
        return SparseShard(16, "float32", ps.init.Normal(std=0.1), ps.optim.SGD(lr=0.1), seed=7)

    a, b = make(), make()
    for _ in range(30):
        fresh = rng.integers(0, 1 << 62, 20_000).astype(np.uint64)
        keys = np.concatenate([fresh, fresh])
        _split(True, monkeypatch)
        got = a.pull(keys)
        _split(False, monkeypatch)
        want = b.pull(keys)
        assert got.tobytes() == want.tobytes()
