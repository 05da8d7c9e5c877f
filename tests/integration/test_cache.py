"""The worker-side row cache (``cache=ps.CacheSpec(...)``) through a real local cluster:
reads never staler than the bound (against a reference that keeps the servers' state at every
clock), no update lost (final weights equal an uncached run's), fewer rows moved on Zipf keys."""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps
from paramserver.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

KEYS = 400
DIM = 3
LR = 0.5


def zipf_batches(steps: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Zipf keys in [0, KEYS) and gradients that are multiples of 1/8: every float32 sum and
    SGD step below is exact, so any order of additions gives the same weights."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        keys = ((rng.zipf(1.3, size) - 1) % KEYS).astype(np.uint64)
        grads = (rng.integers(-8, 9, (size, DIM)) / 8).astype(np.float32)
        out.append((keys, grads))
    return out


def run(client: ps.Client, name: str, cache: ps.CacheSpec | None, per_clock: int = 2) -> dict:
    """Train on the same batches; check every read against the servers' states of the
    clocks it may come from; return the final weights and the table's counters."""
    emb = client.sparse_table(
        name, dim=DIM, init=ps.init.Zeros(), optimizer=ps.optim.SGD(lr=LR), cache=cache
    )
    bound = 0 if cache is None else cache.staleness
    flush_every = 1 if cache is None else cache.flush_every
    server = np.zeros((KEYS, DIM), np.float32)  # the reference: what the servers hold
    states = [server.copy()]  # every state the servers went through ...
    labels = [0]  # ... and the clock it was made in (the first: before any)
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    batches = zipf_batches(30 * per_clock, 256, seed=3)
    oldest = 0
    for step, (keys, grads) in enumerate(batches):
        clock = client.current_clock
        rows = emb.pull(keys)
        # a state replaced in clock t was current up to t: a read at clock c may see it
        # while t >= c - bound, and is then c - t stale
        until = [*labels[1:], clock]
        fresh = [i for i, t in enumerate(until) if t >= clock - bound]
        window = np.stack([states[i] for i in fresh])  # (states, KEYS, DIM)
        match = (window[:, keys.astype(np.int64)] == rows[None]).all(axis=2)  # (states, n)
        assert match.any(axis=0).all(), f"a read at clock {clock} is staler than {bound}"
        freshest = len(fresh) - 1 - np.argmax(match[::-1], axis=0)  # of the states it equals
        oldest = max(oldest, clock - min(until[fresh[i]] for i in freshest.tolist()))
        emb.push(keys, grads).result()
        pending.append((keys, grads))
        end_of_clock = step % per_clock == per_clock - 1
        if len(pending) >= flush_every or end_of_clock:
            for k, g in pending:
                for key, row in zip(k.tolist(), g, strict=True):
                    server[key] -= np.float32(LR) * row
            pending = []
            states.append(server.copy())
            labels.append(clock)
        if end_of_clock:
            client.clock()
    emb.flush().result()
    final = emb.pull(np.arange(KEYS, dtype=np.uint64), create=False)
    np.testing.assert_array_equal(final, server)
    return {"final": final, "traffic": emb.traffic(), "emb": emb, "oldest": oldest}


def test_cached_reads_stay_within_the_bound_and_no_update_is_lost(
    cluster: ps.LocalCluster,
) -> None:
    client = cluster.connect()
    plain = run(client, "plain", None, per_clock=4)
    spec = ps.CacheSpec(rows=256, staleness=2, flush_every=3)  # a flush after 3 pushes and 1
    cached = run(client, "cached", spec, per_clock=4)
    np.testing.assert_array_equal(cached["final"], plain["final"])
    stats = cached["emb"].cache.stats()
    assert stats["hits"] > stats["misses"] > 0
    assert stats["evictions"] > 0  # 400 keys into 256 slots: the cache was full
    assert max(stats["staleness"]) <= 2 and sum(stats["staleness"].values()) == 120 * 256
    assert cached["oldest"] == 2  # some reads were as stale as allowed, none staler
    assert max(cached["emb"].staleness()) <= 2
    # Zipf keys: most lookups hit the cache, pushes of 3 steps go as one
    assert stats["flushes"] == 60 and stats["pushes"] == 120
    assert cached["traffic"]["bytes"] < 0.75 * plain["traffic"]["bytes"]


def test_a_zero_staleness_cache_still_reads_current_rows(cluster: ps.LocalCluster) -> None:
    client = cluster.connect()
    out = run(client, "zero", ps.CacheSpec(rows=1024, staleness=0, flush_every=1), per_clock=2)
    assert out["oldest"] == 0 and out["emb"].cache.stats()["hits"] > 0


def test_cache_settings_are_checked(cluster: ps.LocalCluster) -> None:
    with pytest.raises(ConfigError, match="staleness"):
        ps.CacheSpec(staleness=-1)
    with pytest.raises(ConfigError, match="flush_every"):
        ps.CacheSpec(flush_every=0)
    client = cluster.connect()
    with pytest.raises(ConfigError, match="sync"):
        client.sparse_table("s", dim=2, consistency="sync", cache=ps.CacheSpec())


def test_word2vec_with_a_cache_moves_fewer_rows_and_learns_the_same_groups() -> None:
    """word2vec (``models.word2vec.train_worker``) on a corpus whose words come in planted
    groups (a sentence uses one group's words only), without and with a cache of both tables:
    with it, fewer rows pulled, every cached read at most 2 clocks stale, and the same groups
    learned (each word's nearest neighbours by cosine within its group, both runs)."""
    from paramserver.models import word2vec as w2v

    groups, size = 6, 8
    rng = np.random.default_rng(2)
    sentences = [rng.integers(0, size, 12) + size * rng.integers(0, groups) for _ in range(5000)]
    words = np.array([f"w{i}" for i in np.concatenate(sentences)])
    spec = ps.CacheSpec(rows=1024, staleness=2)
    runs = {}
    for name, cache in (("plain", None), ("cached", spec)):
        with ps.LocalCluster(servers=1, workers=1) as cluster:
            client = cluster.connect()
            out = w2v.train_worker(
                client, words, epochs=2, dim=16, window=2, negative=3, min_count=1, sample=0.0,
                batch=2048, show=False, threads=1, cache=cache,
            )  # fmt: skip
            table = client.table("w2v/in")
            assert isinstance(table, ps.SparseTable)
            vecs = table.pull(np.arange(out["vocabulary"], dtype=np.uint64), create=False)
        vocab = w2v.Vocabulary(words, 1)
        group = np.array([int(w[1:]) for w in vocab.words]) // size
        unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        nearest = np.argsort(-sim, axis=1)[:, : size - 1]  # as many as a word's group-mates
        runs[name] = (out, float((group[nearest] == group[:, None]).mean()))
    (plain, plain_right), (cached, cached_right) = runs["plain"], runs["cached"]
    assert plain_right > 0.9 and cached_right > 0.9, (plain_right, cached_right)
    assert cached["traffic"]["rows_pulled"] < plain["traffic"]["rows_pulled"] / 2
    assert cached["traffic"]["rows_pushed"] == plain["traffic"]["rows_pushed"]
    assert "cache" not in plain and cached["cache"]["hits"] > 0
    assert max(cached["cache"]["staleness"]) <= 2
