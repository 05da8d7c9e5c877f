"""Skip-gram with negative sampling, the worker's side of a step, compiled: negative samples
drawn from the unigram^0.75 distribution (an alias table: two reads a sample, not a binary
search), the distinct words of a batch (a mark per vocabulary word, no sort), and word2vec's
stochastic gradient steps over the batch's pairs, one after another, on the pulled rows of its
distinct words (no ``(batch, 1 + negative, dim)`` temporaries, no expansion of rows to the
batch, no summing of repeated keys: the push carries each word's change once).

Trained pair by pair, a word repeated in a batch sees its own earlier updates, as in word2vec's
C code and gensim; a batch's summed gradient (NumPy's batch form) does not, and diverged on
Lee + Wikipedia at 16,384 pairs a batch. The checks against a plain-Python word2vec step are in
tests/unit/test_word2vec.py.

Imported on first use by :mod:`paramserver.models.word2vec`, so that ``import paramserver``
does not load numba.

Example:
    >>> prob, alias = alias_table(np.array([1.0, 3.0]))
    >>> negatives(np.array([0.1, 0.9]), prob, alias).tolist()
    [0, 1]
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import numpy.typing as npt

__all__ = ["Distinct", "alias_table", "negatives", "train_pairs"]

_Arr = npt.NDArray[Any]


@numba.njit(cache=True, nogil=True)
def _alias(p: Any, prob: Any, alias: Any) -> None:
    n = p.shape[0]
    scaled = p * n
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = nl = 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:  # Vose's method: each cell a small word topped up by a large one
        ns -= 1
        s = small[ns]
        g = large[nl - 1]
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] = (scaled[g] + scaled[s]) - 1.0
        if scaled[g] < 1.0:
            nl -= 1
            small[ns] = g
            ns += 1
    for t in range(nl):  # left over by rounding: a full cell
        prob[large[t]] = 1.0
        alias[large[t]] = large[t]
    for t in range(ns):
        prob[small[t]] = 1.0
        alias[small[t]] = small[t]


def alias_table(weights: _Arr) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Vose's alias table of the distribution proportional to ``weights``: cell ``i`` is word
    ``i`` with probability ``prob[i]``, else word ``alias[i]``.

    Example:
        prob, alias = alias_table(counts.astype(np.float64) ** 0.75)
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"alias_table: weights must be finite, >= 0, not all 0; got {w!r}")
    prob = np.ones(len(w), np.float64)
    alias = np.arange(len(w), dtype=np.int64)
    _alias(w / w.sum(), prob, alias)
    return prob, alias


@numba.njit(cache=True, nogil=True)
def _negatives(u: Any, prob: Any, alias: Any, out: Any) -> None:
    n = prob.shape[0]
    for i in range(u.shape[0]):
        x = u[i] * n
        cell = min(int(x), n - 1)
        out[i] = cell if x - cell < prob[cell] else alias[cell]


def negatives(
    u: npt.NDArray[np.float64], prob: npt.NDArray[np.float64], alias: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Words drawn by the alias table, one for each uniform number in ``u`` (any shape).

    Example:
        neg = negatives(rng.random((batch, 5)), prob, alias)   # (batch, 5) word ids
    """
    out = np.empty(u.shape, np.int64)
    _negatives(u.reshape(-1), prob, alias, out.reshape(-1))
    return out


@numba.njit(cache=True, nogil=True)
def _distinct(ids: Any, mark: Any, uniq: Any, inverse: Any) -> int:
    n = 0
    for i in range(ids.shape[0]):
        w = ids[i]
        at = mark[w]
        if at < 0:
            at = n
            mark[w] = n
            uniq[n] = w
            n += 1
        inverse[i] = at
    for t in range(n):  # the marks back to empty for the next batch
        mark[uniq[t]] = -1
    return n


class Distinct:
    """The distinct words of batches of ids below ``vocabulary``, in order of first sight, and
    each id's index among them; the marks (one int32 a word) are kept from batch to batch.

    Example:
        uniq, inverse = Distinct(10).find(np.array([4, 2, 4]))   # [4, 2], [0, 1, 0]
    """

    def __init__(self, vocabulary: int) -> None:
        self.mark = np.full(vocabulary, -1, np.int32)

    def find(self, ids: _Arr) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int32]]:
        flat = ids.reshape(-1)
        uniq = np.empty(len(flat), np.uint64)
        inverse = np.empty(len(flat), np.int32)
        n = _distinct(flat, self.mark, uniq, inverse)
        return uniq[:n], inverse.reshape(ids.shape)


# reassociation lets the dot products and row updates run in SIMD lanes; no flag that assumes
# finite values, so that a diverging run yields NaN, which the push refuses by name
_FAST = {"reassoc", "contract", "nsz", "arcp"}
MAX_SCORE = 6.0  # word2vec's MAX_EXP: scores beyond it train nothing


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)
def _train(v: Any, u: Any, ic: Any, io: Any, alpha: float) -> float:
    dim = v.shape[1]
    a32 = np.float32(alpha)
    work = np.empty(dim, np.float32)
    loss = 0.0
    for i in range(ic.shape[0]):
        va = v[ic[i]]
        work[:] = 0
        like = 1.0  # the pair's likelihood: one log a pair, not one a word (each >= 1e-7)
        for j in range(io.shape[1]):
            if j > 0 and io[i, j] == io[i, 0]:
                continue  # a negative that is the context itself: skipped, as word2vec does
            ub = u[io[i, j]]
            s = np.float32(0)
            for d in range(dim):
                s += va[d] * ub[d]
            z = min(max(s, np.float32(-30)), np.float32(30))
            sig = np.float32(1) / (np.float32(1) + np.exp(-z))
            if j == 0:  # the context: label 1
                g = (np.float32(1) - sig) * a32
                like *= sig + 1e-7
            else:  # a negative sample: label 0
                g = -sig * a32
                like *= 1 - sig + 1e-7
            if s <= -MAX_SCORE or s >= MAX_SCORE:
                continue  # no step where the sigmoid is flat, as in word2vec's and gensim's code
            for d in range(dim):
                work[d] += g * ub[d]
                ub[d] += g * va[d]
        for d in range(dim):  # the center's row after its context and negatives, as word2vec
            va[d] += work[d]
        loss -= np.log(like)
    return loss


def train_pairs(
    v: npt.NDArray[np.float32],
    u: npt.NDArray[np.float32],
    ic: npt.NDArray[np.int32],
    io: npt.NDArray[np.int32],
    alpha: float,
    pool: ThreadPoolExecutor | None = None,
    runs: int = 1,
) -> float:
    """word2vec's stochastic gradient steps, pair after pair, on the rows of a batch's
    distinct words (updated in place); returns the loss (before each pair's step).

    ``v``: the distinct centers' input rows; ``u``: the distinct output words' rows; pair
    ``i`` is center ``ic[i]`` with its context ``io[i, 0]`` and negatives ``io[i, 1:]``;
    ``alpha``: the rate. As in word2vec's C code, a pair updates the output rows at once and
    its center's row after the last negative (a negative equal to the context is skipped), so
    a word repeated in a batch sees its earlier updates and its gradient saturates, which a
    batch's summed gradient would not (that diverged at 16,384 pairs a batch).

    With a ``pool`` of threads, ``runs`` equal runs of the pairs go to its threads, which
    update the shared rows without locks, as word2vec's and gensim's threads do (Hogwild): a row two threads
    update at once may lose one of the two updates.

    Example:
        before = v.copy(); loss = train_pairs(v, u, ic, io, 0.025); delta = v - before
    """
    if pool is None or runs <= 1 or len(ic) < 2 * runs:
        return float(_train(v, u, ic, io, float(alpha)))
    cut = np.linspace(0, len(ic), runs + 1).astype(np.int64)
    done = [pool.submit(_train, v, u, ic[a:b], io[a:b], float(alpha))
            for a, b in itertools.pairwise(cut)]  # fmt: skip
    return float(sum(r.result() for r in done))
