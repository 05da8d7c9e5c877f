"""Loaders of the real data sets (fetched with :func:`~paramserver.data.fetch.fetch`).

* MovieLens-100K as CTR data: a click is a rating >= 4; fields user, item, age, gender,
  occupation, zip prefix, release year and up to three genres; split by time or at random.
* Text for word2vec: a Wikipedia XML excerpt and the Lee news corpus; the Google analogy
  questions (``questions-words.txt``) and WordSim353.
* Images: 5,000 MNIST digits (shuffled: the file is sorted by label) or scikit-learn's digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paramserver.data.ctr import CTRBatch
from paramserver.data.fetch import fetch
from paramserver.data.formats import read_text
from paramserver.data.hashing import hash_field, hash_strings
from paramserver.errors import ConfigError, DataError

__all__ = [
    "MOVIELENS_FIELDS",
    "Analogies",
    "load_analogies",
    "load_digits",
    "load_mnist5k",
    "load_movielens",
    "load_text_corpus",
    "load_wordsim",
]

MOVIELENS_FIELDS = (
    "user", "item", "age", "gender", "occupation", "zip", "year", "genre1", "genre2", "genre3",
)  # fmt: skip


def load_movielens(
    split: str = "time", *, test_fraction: float = 0.2, seed: int = 0, folder: Path | None = None
) -> tuple[CTRBatch, CTRBatch]:
    """MovieLens-100K as (train, test) CTRBatches; ``split`` is ``"time"`` (the latest ratings
    are the test set) or ``"random"``.

    Example:
        train, test = load_movielens("time")     # 80,000 / 20,000 ratings, 10 fields
    """
    import pandas as pd

    if split not in ("time", "random"):
        raise ConfigError(f"split must be 'time' or 'random', got {split!r}")
    root = folder or fetch("movielens-100k")
    inter, users, items = (
        pd.read_csv(root / f"ml-100k.{name}", sep="\t", dtype=str, keep_default_na=False)
        for name in ("inter", "user", "item")
    )
    inter.columns = [c.split(":")[0] for c in inter.columns]
    users.columns = [c.split(":")[0] for c in users.columns]
    items.columns = [c.split(":")[0] for c in items.columns]
    df = inter.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    df = df.fillna("")
    rating = pd.to_numeric(df["rating"], errors="coerce").to_numpy(np.float64)
    if np.isnan(rating).any():
        raise DataError(f"{root / 'ml-100k.inter'}: a rating is not a number")
    stamp = pd.to_numeric(df["timestamp"], errors="coerce").to_numpy(np.float64)
    genres = df["class"].str.split(" ", n=3, expand=True).reindex(columns=range(3)).fillna("")
    cols = [
        df["user_id"], df["item_id"], df["age"], df["gender"], df["occupation"],
        df["zip_code"].str[:3], df["release_year"], genres[0], genres[1], genres[2],
    ]  # fmt: skip
    keys = np.stack(
        [hash_field(j, hash_strings(c.to_numpy(dtype=object))) for j, c in enumerate(cols)],
        axis=1,
    )
    age = pd.to_numeric(df["age"], errors="coerce").fillna(30).to_numpy(np.float32)
    year = pd.to_numeric(df["release_year"], errors="coerce").fillna(1990).to_numpy(np.float32)
    dense = np.stack([(age - 30) / 15, (year - 1990) / 15], axis=1).astype(np.float32)
    data = CTRBatch(keys, dense, (rating >= 4).astype(np.float32))
    n_test = int(len(data) * test_fraction)
    if split == "time":
        order = np.argsort(stamp, kind="stable")
    else:
        order = np.random.default_rng(seed).permutation(len(data))
    # the training part is shuffled (a fixed seed): time order would make SGD chase a drift
    train_idx = np.random.default_rng(seed + 1).permutation(order[: len(data) - n_test])
    return data.take(train_idx), data.take(order[len(data) - n_test :])


def load_text_corpus(folder: Path | None = None, *, wiki: bool = True) -> np.ndarray:
    """Word tokens (bytes) of the Lee background corpus and, with ``wiki``, the Wikipedia excerpt.

    Example:
        words = load_text_corpus()     # ~ 0.9 M tokens
    """
    root = folder or fetch("gensim-text")
    parts = list(read_text(root / "lee_background.cor"))
    if wiki:
        name = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
        parts += list(read_text(root / name, markup=True))
    return np.concatenate(parts)


@dataclass(frozen=True)
class Analogies:
    """Analogy questions ``a : b :: c : d`` as word arrays, with their section names."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    d: np.ndarray
    section: np.ndarray


def load_analogies(folder: Path | None = None) -> Analogies:
    """The Google analogy questions (lower-cased), e.g. ``athens greece baghdad iraq``."""
    root = folder or fetch("gensim-text")
    raw = (root / "questions-words.txt").read_bytes().lower()
    lines = np.array(raw.splitlines(), dtype=np.bytes_)
    is_head = np.char.startswith(lines, b":")
    section = np.cumsum(is_head) - 1
    names = np.char.strip(np.char.lstrip(lines[is_head], b":"))
    q = lines[~is_head]
    parts = np.char.split(q)
    words = np.array([p for p in parts if len(p) == 4], dtype=np.bytes_)  # the file's few lines
    if len(words) != len(q):
        raise DataError(f"{root / 'questions-words.txt'}: a question does not have 4 words")
    return Analogies(words[:, 0], words[:, 1], words[:, 2], words[:, 3], names[section[~is_head]])


def load_wordsim(folder: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WordSim353: (first words, second words, human scores)."""
    import pandas as pd

    root = folder or fetch("gensim-text")
    df = pd.read_csv(root / "wordsim353.tsv", sep="\t", comment="#", header=None, dtype=str)
    w1 = df[0].str.lower().str.encode("utf-8").to_numpy(dtype=np.bytes_)
    w2 = df[1].str.lower().str.encode("utf-8").to_numpy(dtype=np.bytes_)
    return w1, w2, df[2].astype(float).to_numpy()


def load_mnist5k(
    *, test_fraction: float = 0.2, seed: int = 0, folder: Path | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """5,000 MNIST digits: (x_train, y_train, x_test, y_test), pixels scaled to [0, 1], shuffled.

    Example:
        x, y, xt, yt = load_mnist5k()        # (4000, 784) float32, int64 labels
    """
    import pandas as pd

    root = folder or fetch("mnist-5k")
    table = pd.read_csv(root / "mnist_5k.csv.gz", header=None, dtype=np.float32).to_numpy()
    x, y = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
    return _split(x.astype(np.float32), y, test_fraction, seed)


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images; offline), scaled to [0, 1], shuffled."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _split(
        (d.data / 16.0).astype(np.float32), d.target.astype(np.int64), test_fraction, seed
    )


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    tr, te = order[n_test:], order[:n_test]
    return x[tr], y[tr], x[te], y[te]
