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
