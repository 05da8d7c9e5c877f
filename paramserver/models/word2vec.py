"""word2vec: skip-gram with negative sampling, both embedding tables on the servers.

The corpus (the Lee news corpus and a Wikipedia excerpt shipped with gensim's tests, fetched, or
your own text file or folder: ``--corpus PATH``) is read once, words seen fewer than ``--min-count`` times are dropped, frequent words are
subsampled, and (center, context) pairs are made with word2vec's shrinking window, all with
array operations. Each step pulls the centers' input vectors and the contexts' and negative
samples' output vectors (each distinct word once), runs word2vec's SGD over its pairs one
after another on those rows in compiled code (:mod:`paramserver.models.sgns`, ``--threads``
threads without locks, as gensim's), at a rate decaying linearly over the run, and pushes each
row's change (the tables' SGD at rate 1 adds it). Workers' changes add up on the servers.

Evaluation: accuracy on the Google analogy questions whose four words are all in the vocabulary
(3CosAdd, the three question words excluded), with that coverage, and the Spearman correlation
with WordSim353. ``--gensim`` also trains gensim's Word2Vec on the same tokens with the same
settings and evaluates it the same way.

    paramserver train word2vec --epochs 3 --gensim
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import paramserver as ps
from paramserver.data.evaluate import spearman
from paramserver.models.program import (
    ArrayFeed,
    PushesInFlight,
    Report,
    entry,
    finish,
    fit,
    program_parser,
)

__all__ = ["Vocabulary", "evaluate", "main", "parser", "read_corpus", "train", "train_worker"]


# pairs a step: a step's fixed costs (requests, copies) shrink with it, and the rows a step
# moves stop growing once most of the vocabulary is in every step (the contexts and negatives
# of 32,768 pairs of Lee + Wikipedia hold 11,122 of its 11,171 words); as the pairs are trained
# one after another on the pulled rows, quality does not fall with it (5 epochs: the same
# analogy accuracy and WordSim353 rho at 2,048, 8,192, 32,768 and 65,536)
BATCH = 65_536


class Vocabulary:
    """Words with at least ``min_count`` occurrences, most frequent first (id 0)."""

    def __init__(self, words: np.ndarray, min_count: int) -> None:
        uniq, counts = np.unique(words, return_counts=True)
        keep = counts >= min_count
        order = np.argsort(-counts[keep], kind="stable")
        self.words = uniq[keep][order]
        self.counts = counts[keep][order]
        self._sorted = np.argsort(self.words)

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, words: np.ndarray) -> np.ndarray:
        """Ids of ``words`` (-1 for words outside the vocabulary), vectorized."""
        sw = self.words[self._sorted]
        pos = np.clip(np.searchsorted(sw, words), 0, max(len(sw) - 1, 0))
        found = sw[pos] == words if len(sw) else np.zeros(len(words), bool)
        return np.where(found, self._sorted[pos], -1)


class _Tokens:
    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: slice) -> _Tokens:
        return _Tokens(self.ids[idx])


def _keep_probability(counts: np.ndarray, sample: float) -> np.ndarray:
    """word2vec's subsampling: the probability of keeping each word of the vocabulary."""
    if sample <= 0:
        return np.ones(len(counts))
    f = counts / counts.sum()
    out: np.ndarray = np.minimum((np.sqrt(f / sample) + 1) * sample / f, 1.0)
    return out


def pairs(
    ids: np.ndarray, counts: np.ndarray, window: int, sample: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Subsample ``ids`` and return shuffled (center, context) pairs (word2vec's rules)."""
    kept = ids[rng.random(len(ids)) < _keep_probability(counts, sample)[ids]]
    reach = rng.integers(1, window + 1, size=len(kept))
    cs, xs = [], []
    for off in range(1, window + 1):  # a loop over offsets, not over tokens
        a, b = kept[:-off], kept[off:]
        m1 = reach[:-off] >= off  # a is the center, b its context
        m2 = reach[off:] >= off  # b is the center, a its context
        cs += [a[m1], b[m2]]
        xs += [b[m1], a[m2]]
    c, x = np.concatenate(cs), np.concatenate(xs)
    order = rng.permutation(len(c))
    return c[order], x[order]


def evaluate(
    vectors: np.ndarray, vocab: Vocabulary, analogies: Any, wordsim: Any
) -> dict[str, float]:
    """Analogy accuracy on the covered questions, coverage, and WordSim353 Spearman rho."""
    norm = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    q = np.stack([vocab.ids(analogies.a), vocab.ids(analogies.b), vocab.ids(analogies.c),
                  vocab.ids(analogies.d)], axis=1)  # fmt: skip
    covered = (q >= 0).all(axis=1)
    q = q[covered]
    correct = 0
    for i in range(0, len(q), 1024):  # blocks of questions: a (1024 x vocabulary) score matrix
        blk = q[i : i + 1024]
        target = norm[blk[:, 1]] - norm[blk[:, 0]] + norm[blk[:, 2]]
        scores = target @ norm.T
        rows = np.arange(len(blk))
        for j in range(3):
            scores[rows, blk[:, j]] = -np.inf
        correct += int((scores.argmax(axis=1) == blk[:, 3]).sum())
    w1, w2, human = wordsim
    i1, i2 = vocab.ids(w1), vocab.ids(w2)
    ok = (i1 >= 0) & (i2 >= 0)
    cos = (norm[i1[ok]] * norm[i2[ok]]).sum(axis=1)
    return {
        "analogy_accuracy": correct / max(len(q), 1),
        "analogy_coverage": float(covered.mean()),
        "wordsim_spearman": spearman(cos, human[ok]),
        "wordsim_coverage": float(ok.mean()),
    }


def train_worker(
    client: ps.Client,
    words: np.ndarray,
    *,
    epochs: int = 3,
    dim: int = 100,
    window: int = 5,
    negative: int = 5,
    min_count: int = 5,
    sample: float = 1e-3,
    lr: float = 0.025,
    batch: int = BATCH,
    consistency: str = "async",
    evaluation: tuple[Any, Any] | None = None,
    report: Report | None = None,
    show: bool = True,
    seed: int = 0,
    threads: int = 2,
    cache: ps.CacheSpec | None = None,
) -> dict[str, Any]:
    """Train on leased shards of the token stream; rank 0 evaluates after each epoch.
    ``cache``: a worker-side cache of both embedding tables (``ps.CacheSpec``; a clock is a
    step). Returns the evaluation curve, the vocabulary's and the token stream's sizes, the
    rows and bytes this worker moved (``traffic``) and, with a cache, its counts (``cache``)."""
    for what, value in (("batch", batch), ("threads", threads)):
        if value < 1:
            raise ps.errors.ConfigError(f"word2vec: {what} must be at least 1, got {value}")
    vocab = Vocabulary(words, min_count)
    ids = vocab.ids(words)
    ids = ids[ids >= 0]
    rng = np.random.default_rng([seed, client.rank])
    # the pairs this worker makes in all (expected): a kept token is the center of 2 * its
    # shrunk window's (window + 1) / 2 pairs on average
    kept = float((vocab.counts * _keep_probability(vocab.counts, sample)).sum())
    total_pairs = max(1.0, epochs * kept * (window + 1) / max(client.num_workers, 1))
    trainer = _Trainer(client, vocab, dim=dim, negative=negative, lr=lr, total_pairs=total_pairs,
                       consistency=consistency, evaluation=evaluation, rng=rng,
                       threads=threads, cache=cache)  # fmt: skip

    def split(part: _Tokens) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        centers, contexts = pairs(part.ids, vocab.counts, window, sample, rng)
        for i in range(0, len(centers), batch):
            yield centers[i : i + batch], contexts[i : i + batch]

    feed = ArrayFeed("w2v/corpus", _Tokens(ids), rows=50_000, batch=batch, split=split)
    try:
        fit(client, feed, trainer, name="w2v", epochs=epochs, consistency=consistency,
            report=report, show=show)  # fmt: skip
    finally:
        if trainer.pool is not None:
            trainer.pool.shutdown()
    tables = (trainer.emb_in, trainer.emb_out)
    traffic = {
        k: sum(t.traffic()[k] for t in tables) for k in ("rows_pulled", "rows_pushed", "bytes")
    }
    out: dict[str, Any] = {
        "curve": trainer.curve, "vocabulary": len(vocab), "tokens": len(ids), "traffic": traffic,
    }  # fmt: skip
    if cache is not None:
        counts = [t.cache.stats() for t in tables if t.cache is not None]
        staleness = sum((Counter(c["staleness"]) for c in counts), Counter[int]())
        out["cache"] = {
            "hits": sum(c["hits"] for c in counts),
            "misses": sum(c["misses"] for c in counts),
            "staleness": dict(sorted(staleness.items())),  # {clocks: reads}, both tables
        }
    return out


class _Trainer(PushesInFlight):
    """Skip-gram steps: pull the centers' input vectors and the contexts' and negatives' output
    vectors, push the negative-sampling gradients; the rate decays linearly."""

    def __init__(
        self, client: ps.Client, vocab: Vocabulary, *, dim: int, negative: int, lr: float,
        total_pairs: float, consistency: str, evaluation: tuple[Any, Any] | None,
        rng: np.random.Generator, threads: int = 1, cache: ps.CacheSpec | None = None,
    ) -> None:  # fmt: skip
        self.emb_in = client.sparse_table(
            "w2v/in", dim=dim, init=ps.init.Uniform(-1.0 / dim, 1.0 / dim),  # as gensim
            optimizer=ps.optim.SGD(lr=1.0), consistency=consistency, cache=cache,
        )  # fmt: skip
        self.emb_out = client.sparse_table(
            "w2v/out", dim=dim, init=ps.init.Zeros(), optimizer=ps.optim.SGD(lr=1.0),
            consistency=consistency, cache=cache,
        )  # fmt: skip
        from paramserver.models import sgns  # numba: on first use

        self.sgns = sgns
        self.prob, self.alias = sgns.alias_table(vocab.counts.astype(np.float64) ** 0.75)
        self.centers, self.outs = sgns.Distinct(len(vocab)), sgns.Distinct(len(vocab))
        self.vocab, self.negative, self.lr, self.total_pairs = vocab, negative, lr, total_pairs
        self.pairs = 0
        self.evaluation, self.rng = evaluation, rng
        self.steps = 0
        # the kernel's threads (word2vec's and gensim's Hogwild threads); none for one
        self.pool = ThreadPoolExecutor(threads, "w2v-kernel") if threads > 1 else None
        self.threads = threads
        self.pending: list[ps.Future[None]] = []
        self.curve: list[dict[str, float]] = []

    def step(self, batch: tuple[np.ndarray, np.ndarray], nxt: Any) -> tuple[float, int]:
        c, x = batch
        neg = self.sgns.negatives(self.rng.random((len(c), self.negative)), self.prob, self.alias)
        uc, ic = self.centers.find(c)
        uo, io = self.outs.find(np.concatenate([x[:, None], neg], axis=1))
        fut_v = self.emb_in.pull_async(uc)
        u, v = self.emb_out.pull(uo), fut_v.result()
        self.flush()  # the previous step's changes are sent: their buffers are free again
        rate = self.lr * max(1e-4, 1 - self.pairs / self.total_pairs)  # word2vec's linear decay
        v0, u0 = v.copy(), u.copy()
        loss = self.sgns.train_pairs(v, u, ic, io, rate, self.pool, self.threads)
        # the servers' SGD at rate 1 subtracts what it is handed: the change, negated
        self.pending = [self.emb_in.push(uc, np.subtract(v0, v, out=v0)),
                        self.emb_out.push(uo, np.subtract(u0, u, out=u0))]  # fmt: skip
        self.steps += 1
        self.pairs += len(ic)
        return loss, len(ic)

    def evaluate(self) -> dict[str, float]:
        m: dict[str, float] = {}
        if self.evaluation is not None:
            keys = np.arange(len(self.vocab), dtype=np.uint64)
            m = evaluate(self.emb_in.pull(keys, create=False), self.vocab, *self.evaluation)
        self.curve.append(m)
        return m


def gensim_reference(
    words: np.ndarray, args: argparse.Namespace, evaluation: tuple[Any, Any]
) -> dict[str, float]:
    """gensim's Word2Vec on the same tokens and settings, evaluated the same way."""
    from gensim.models import Word2Vec

    text = words.astype(str)
    sentences = [list(text[i : i + 10_000]) for i in range(0, len(text), 10_000)]
    model = Word2Vec(
        sentences, vector_size=args.dim, window=args.window, negative=args.negative, sg=1,
        min_count=args.min_count, sample=args.sample, alpha=args.lr, epochs=args.epochs,
        workers=getattr(args, "threads", 2), seed=1,
    )  # fmt: skip
    vocab = Vocabulary(words, args.min_count)
    vectors = np.zeros((len(vocab), args.dim), np.float32)
    known = np.array([w in model.wv.key_to_index for w in vocab.words.astype(str)])
    vectors[known] = model.wv[list(vocab.words.astype(str)[known])]
    return evaluate(vectors, vocab, *evaluation)


BUILT_IN = ("lee", "lee+wiki")


def read_corpus(corpus: str) -> np.ndarray:
    """The word tokens of ``--corpus``: a built-in corpus, a text file or a folder of them.

    Example:
        words = read_corpus("my_texts/")     # bytes tokens, lower case
    """
    from pathlib import Path

    from paramserver.data.datasets import load_text_corpus
    from paramserver.data.formats import read_text

    if corpus in BUILT_IN:
        return load_text_corpus(wiki=corpus == "lee+wiki")
    root = Path(corpus)
    if root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
    elif root.is_file():
        files = [root]
    else:
        raise ps.errors.DataError(
            f"--corpus {corpus!r}: neither {' nor '.join(BUILT_IN)} nor a file or folder"
        )
    parts = [block for f in files for block in read_text(f)]
    words = np.concatenate(parts) if parts else np.empty(0, "S1")
    if len(words) == 0:
        raise ps.errors.DataError(f"--corpus {corpus}: no word in {len(files)} file(s)")
    return words


def _evaluation_sets(corpus: str) -> tuple[Any, Any] | None:
    """The analogy questions and WordSim353; None (no evaluation) where a user's corpus is
    trained offline and they cannot be fetched."""
    from paramserver.data.datasets import load_analogies, load_wordsim
    from paramserver.data.fetch import RegistryUnreachable

    try:
        return load_analogies(), load_wordsim()
    except RegistryUnreachable as exc:
        if corpus in BUILT_IN:
            raise
        print(f"word2vec: no evaluation sets ({exc}); training without evaluation", flush=True)
        return None


def parser() -> argparse.ArgumentParser:
    p = program_parser("word2vec", __doc__)
    p.add_argument(
        "--corpus",
        default="lee+wiki",
        help="lee (the Lee news corpus), lee+wiki (and a Wikipedia excerpt), both fetched; or "
        "PATH: a text file or a folder of text files (read recursively, in name order), cut "
        "into lower-case words: a letter, then letters, digits and apostrophes (ASCII)",
    )
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negative", type=int, default=5)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--sample", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=0.025)
    p.add_argument("--batch", type=int, default=BATCH, help="(center, context) pairs a step")
    p.add_argument("--threads", type=int, default=2, help="threads of each worker's kernel "
                   "(updates without locks, as word2vec's and gensim's threads)")  # fmt: skip
    p.add_argument("--consistency", default="async", help="sync, ssp:N or async")
    p.add_argument("--cache-rows", type=int, default=0, help="rows of a worker-side cache of "
                   "both embedding tables (ps.CacheSpec; 0: none)")  # fmt: skip
    p.add_argument("--cache-staleness", type=int, default=1, help="steps a cached row may be "
                   "behind the servers' (1 kept the quality in docs/performance.md; 2 did not)")  # fmt: skip
    p.add_argument("--gensim", action="store_true", help="also train gensim's Word2Vec")
    return p


def _cache(args: argparse.Namespace) -> ps.CacheSpec | None:
    """The ``--cache-*`` options as a CacheSpec (None without ``--cache-rows``)."""
    if args.cache_rows == 0:
        return None
    try:
        return ps.CacheSpec(rows=args.cache_rows, staleness=args.cache_staleness)
    except ps.errors.ConfigError as exc:
        raise ps.errors.ConfigError(f"word2vec --cache-rows / --cache-staleness: {exc}") from None


def train(client: ps.Client, args: argparse.Namespace) -> int:
    """The program: read the corpus, train, evaluate, report (rank 0)."""
    cache = _cache(args)  # checked before the corpus is read
    words = read_corpus(args.corpus)
    evaluation = _evaluation_sets(args.corpus)
    lead = client.rank == 0
    report = Report("word2vec", args.out, show=lead, corpus=args.corpus, title="word2vec skip-gram")
    if lead:
        print(f"word2vec: {len(words)} tokens ({args.corpus}); {client.num_servers} servers, "
              f"{client.num_workers} workers", flush=True)  # fmt: skip
    out = train_worker(
        client, words, epochs=args.epochs, dim=args.dim, window=args.window,
        negative=args.negative, min_count=args.min_count, sample=args.sample, lr=args.lr,
        batch=args.batch, consistency=args.consistency, evaluation=evaluation, report=report,
        show=not args.no_progress, threads=args.threads, cache=cache,
    )  # fmt: skip
    if lead:
        report.info["vocabulary"] = out["vocabulary"]
        report.info["traffic"] = out["traffic"]
        if "cache" in out:
            report.info["cache"] = out["cache"]
        if args.gensim and evaluation is not None:
            ref = gensim_reference(words, args, evaluation)
            report.info["gensim"] = ref
            mine = out["curve"][-1]
            print(f"word2vec: gensim Word2Vec, same tokens and settings: analogy accuracy "
                  f"{ref['analogy_accuracy']:.4f} (coverage {ref['analogy_coverage']:.3f}), "
                  f"WordSim353 rho {ref['wordsim_spearman']:.4f}; paramserver: "
                  f"{mine['analogy_accuracy']:.4f}, rho {mine['wordsim_spearman']:.4f}", flush=True)  # fmt: skip
    return finish(report, lead)


main = entry("paramserver.models.word2vec", parser, train)


if __name__ == "__main__":
    sys.exit(main())
