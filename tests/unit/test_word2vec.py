"""word2vec's pieces against hand-made references."""

from __future__ import annotations

import numpy as np

from paramserver.data.datasets import Analogies
from paramserver.models.word2vec import Vocabulary, evaluate, pairs


def test_vocabulary_and_pairs() -> None:
    words = np.array([b"a", b"b", b"a", b"c", b"a", b"b", b"zz"], dtype=np.bytes_)
    v = Vocabulary(words, min_count=2)
    assert list(v.words) == [b"a", b"b"] and list(v.counts) == [3, 2]
    np.testing.assert_array_equal(v.ids(np.array([b"b", b"zz", b"a"])), [1, -1, 0])
    ids = np.arange(10)
    c, x = pairs(ids, np.ones(10, np.int64), window=2, sample=0.0, rng=np.random.default_rng(0))
    assert len(c) == len(x) > 0
    assert (np.abs(c - x) >= 1).all() and (np.abs(c - x) <= 2).all()
    assert {(a, b) for a, b in zip(c.tolist(), x.tolist(), strict=True) if abs(a - b) == 1} == {
        (i, j) for i in range(10) for j in (i - 1, i + 1) if 0 <= j < 10
    }  # every neighbour pair is kept: the shrunk window is at least 1


def test_analogy_and_wordsim_evaluation() -> None:
    words = np.array([b"king", b"queen", b"man", b"woman", b"x"], dtype=np.bytes_)
    v = Vocabulary(np.repeat(words, [5, 4, 3, 2, 1]), min_count=1)
    vec = {
        b"king": [1, 1, 0],
        b"queen": [1, 0, 1],
        b"man": [0, 1, 0],
        b"woman": [0, 0, 1],
        b"x": [-1, 0, 0],
    }
    vectors = np.array([vec[w] for w in v.words], dtype=np.float32)
    q = Analogies(
        np.array([b"man", b"man"]), np.array([b"king", b"king"]), np.array([b"woman", b"nope"]),
        np.array([b"queen", b"queen"]), np.array([b"s", b"s"]),
    )  # fmt: skip
    ws = (
        np.array([b"king", b"man", b"king"]),
        np.array([b"queen", b"woman", b"x"]),
        np.array([3.0, 2.0, 1.0]),
    )
    m = evaluate(vectors, v, q, ws)
    assert m["analogy_accuracy"] == 1.0 and m["analogy_coverage"] == 0.5
    assert m["wordsim_coverage"] == 1.0
    assert np.isfinite(m["wordsim_spearman"])


def reference_steps(
    v: np.ndarray, u: np.ndarray, c: np.ndarray, outs: np.ndarray, alpha: float
) -> float:
    """word2vec.c's skip-gram step, pair after pair, in plain Python (a test only): the output
    rows change at once, the center's row after its context and negatives."""
    loss = 0.0
    for a, row in zip(c.tolist(), outs.tolist(), strict=True):
        work = np.zeros(v.shape[1], np.float64)
        for j, b in enumerate(row):
            if j > 0 and b == row[0]:
                continue
            score = float(v[a] @ u[b])
            sig = 1.0 / (1.0 + np.exp(-np.clip(score, -30, 30)))
            loss -= np.log((sig if j == 0 else 1 - sig) + 1e-7)
            if abs(score) >= 6:
                continue  # word2vec's MAX_EXP: no step where the sigmoid is flat
            g = ((1.0 if j == 0 else 0.0) - sig) * alpha
            work += g * u[b]
            u[b] += g * v[a]
        v[a] += work
    return loss


def test_compiled_steps_match_word2vec_pair_by_pair() -> None:
    from paramserver.models.sgns import Distinct, train_pairs

    rng = np.random.default_rng(3)
    vocab, dim, b, k = 50, 16, 300, 5  # a small vocabulary: many repeated words in a batch
    v = rng.normal(0, 0.8, (vocab, dim))  # scores beyond 6 too, which train nothing
    u = rng.normal(0, 0.8, (vocab, dim))
    c = rng.integers(0, vocab, b)
    outs = rng.integers(0, vocab, (b, 1 + k))
    outs[:3, 1] = outs[:3, 0]  # a negative that is also the context
    outs[3, 0] = c[3]  # a word its own context
    uc, ic = Distinct(vocab).find(c)
    uo, io = Distinct(vocab).find(outs)
    assert sorted(uc.tolist()) == sorted(set(c.tolist())) and (uc[ic] == c).all()
    assert (uo[io] == outs).all() and len(set(uo.tolist())) == len(uo)
    rv, ru = v[uc.astype(np.int64)].astype(np.float32), u[uo.astype(np.int64)].astype(np.float32)
    loss = train_pairs(rv, ru, ic, io, 0.05)
    ref_loss = reference_steps(v, u, c, outs, 0.05)
    np.testing.assert_allclose(rv, v[uc.astype(np.int64)], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ru, u[uo.astype(np.int64)], rtol=1e-4, atol=1e-5)
    assert abs(loss - ref_loss) <= 1e-4 * ref_loss


def test_distinct_marks_are_cleared_between_batches() -> None:
    from paramserver.models.sgns import Distinct

    d = Distinct(10)
    for ids in (np.array([4, 2, 4, 9]), np.array([[9, 9], [0, 4]]), np.array([7])):
        uniq, inverse = d.find(ids)
        assert uniq.tolist() == list(dict.fromkeys(ids.reshape(-1).tolist()))
        assert inverse.shape == ids.shape and (uniq[inverse] == ids).all()
    assert (d.mark == -1).all()


def test_alias_table_draws_the_unigram_power_distribution() -> None:
    from paramserver.models.sgns import alias_table, negatives

    counts = np.array([1000, 300, 300, 40, 7, 7, 1, 0, 5000], np.float64)
    p = counts**0.75 / (counts**0.75).sum()
    prob, alias = alias_table(counts**0.75)
    # each word's probability as the table holds it: its own cells' share plus the cells that
    # alias to it, each 1/n of the draws
    n = len(counts)
    held = prob / n + np.bincount(alias, weights=(1 - prob) / n, minlength=n)
    np.testing.assert_allclose(held, p, atol=1e-12)
    draws = negatives(np.random.default_rng(0).random(400_000), prob, alias)
    freq = np.bincount(draws, minlength=n) / len(draws)
    assert freq[7] == 0  # a word never seen is never drawn
    sd = np.sqrt(p * (1 - p) / len(draws))  # the binomial spread of each word's frequency
    assert (np.abs(freq - p) <= 4 * sd + 1e-9).all(), (freq, p)


def test_threads_split_the_pairs_and_update_the_shared_rows() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from paramserver.models.sgns import Distinct, train_pairs

    rng = np.random.default_rng(5)
    vocab, dim, b = 40, 8, 400
    v = rng.normal(0, 0.5, (vocab, dim))
    u = rng.normal(0, 0.5, (vocab, dim))
    # the two halves of the batch use disjoint words: no row is updated by both threads, so
    # the threaded result is the sequential one exactly
    c = np.concatenate([rng.integers(0, 20, b // 2), rng.integers(20, 40, b // 2)])
    outs = np.concatenate([rng.integers(0, 20, (b // 2, 4)), rng.integers(20, 40, (b // 2, 4))])
    uc, ic = Distinct(vocab).find(c)
    uo, io = Distinct(vocab).find(outs)
    rv, ru = v[uc.astype(np.int64)].astype(np.float32), u[uo.astype(np.int64)].astype(np.float32)
    with ThreadPoolExecutor(2) as pool:
        loss = train_pairs(rv, ru, ic, io, 0.05, pool, 2)
    ref_loss = reference_steps(v, u, c, outs, 0.05)
    np.testing.assert_allclose(rv, v[uc.astype(np.int64)], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ru, u[uo.astype(np.int64)], rtol=1e-4, atol=1e-5)
    assert abs(loss - ref_loss) <= 1e-4 * ref_loss
