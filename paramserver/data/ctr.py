"""Click-through-rate examples: the batch type, the Criteo TSV reader and a synthetic generator.

A :class:`CTRBatch` is what every CTR model eats: ``keys`` (examples x fields, uint64 hashed
(field, value) keys; one key per field), ``dense`` (examples x numeric fields, float32) and ``y``
(float32 labels in {0, 1}).

Criteo's display-advertising format is one example per line: the label, 13 integer fields and 26
categorical fields (8 hex digits), tab-separated, empty where missing. :func:`read_criteo`
streams such a file in blocks; each block is split and parsed as a whole.

:class:`SyntheticCriteo` generates data in that format (power-law value frequencies, labels drawn
from a known logistic model), for benchmarks and offline runs. It is synthetic and says so
wherever it is used.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paramserver.data.hashing import bucketize_log, hash_field, hash_strings
from paramserver.data.lines import BadLines, good_lines, keep_lines, line_blocks
from paramserver.errors import ConfigError
from paramserver.mix import splitmix64

__all__ = ["CRITEO_CAT", "CRITEO_INT", "CTRBatch", "SyntheticCriteo", "check_labels", "read_criteo"]

CRITEO_INT, CRITEO_CAT = 13, 26
_TAB = 9


@dataclass(frozen=True)
class CTRBatch:
    """Examples of a CTR data set.

    Example:
        b = CTRBatch(keys=np.zeros((2, 3), np.uint64), dense=np.zeros((2, 0), np.float32),
                     y=np.array([0, 1], np.float32))
    """

    keys: np.ndarray
    dense: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.y)
        if (
            self.keys.ndim != 2
            or len(self.keys) != n
            or self.dense.ndim != 2
            or len(self.dense) != n
        ):
            raise ConfigError(
                f"CTRBatch: keys {self.keys.shape}, dense {self.dense.shape} and y {self.y.shape} "
                "must have one row per example"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def fields(self) -> int:
        return int(self.keys.shape[1])

    def take(self, idx: np.ndarray | slice) -> CTRBatch:
        """The examples at ``idx`` (an index array or a slice)."""
        return CTRBatch(self.keys[idx], self.dense[idx], self.y[idx])

    @staticmethod
    def concat(batches: list[CTRBatch]) -> CTRBatch:
        """One batch of all ``batches``' examples, in order."""
        if not batches:
            raise ConfigError("CTRBatch.concat needs at least one batch")
        return CTRBatch(
            np.concatenate([b.keys for b in batches]),
            np.concatenate([b.dense for b in batches]),
            np.concatenate([b.y for b in batches]),
        )


def check_labels(y: np.ndarray, where: str, lines: np.ndarray | None, bad: BadLines) -> np.ndarray:
    """Mask of the examples whose label is 0 or 1; the others are reported to ``bad``."""
    ok = (y == 0) | (y == 1)
    if not ok.all():
        nums = lines[~ok] if lines is not None else np.flatnonzero(~ok) + 1
        vals = y[~ok]
        bad.add(where, nums, [f"label {v!r} is not 0 or 1" for v in vals.tolist()])
    return np.asarray(ok, dtype=bool)


def read_criteo(
    path: str | Path,
    *,
    bad: BadLines | None = None,
    block_bytes: int = 8 << 20,
    start: int = 0,
    stop: int | None = None,
    first_line: int = 1,
) -> Iterator[CTRBatch]:
    """Stream a Criteo TSV file (plain, .gz or .bz2) as CTRBatches of about ``block_bytes``.

    Keys: the 26 categorical fields hashed as (field, string) and the 13 integer fields bucketized
    (:func:`~paramserver.data.hashing.bucketize_log`) and hashed, 39 keys per example; ``dense``:
    ``log1p`` of the 13 integer fields (0 where missing or negative).

    Example:
        for batch in read_criteo("day_0.gz", bad=BadLines("skip")): ...
    """
    import pandas as pd

    bad = bad or BadLines()
    ncol = 1 + CRITEO_INT + CRITEO_CAT
    for first, block in line_blocks(
        path, block_bytes=block_bytes, start=start, stop=stop, first_line=first_line
    ):
        kind = "tab-separated "
        starts, ends, numbers, keep = good_lines(block, first, _TAB, ncol, bad, path, kind)
        if not keep.any():
            continue
        good = keep_lines(block, starts, ends, keep)
        lines = numbers[keep]
        df = pd.read_csv(
            _io(good),
            sep="\t",
            header=None,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            engine="c",
            quoting=3,  # csv.QUOTE_NONE: a quote is an ordinary character in this format
        )
        table = df.to_numpy(dtype=object)
        label = pd.to_numeric(table[:, 0], errors="coerce").astype(np.float64)
        ints = np.empty((len(table), CRITEO_INT), dtype=np.float64)
        ok = np.ones(len(table), dtype=bool)
        for j in range(CRITEO_INT):  # a loop over the 13 columns, not over rows
            col = table[:, 1 + j]
            num = pd.to_numeric(col, errors="coerce").astype(np.float64)
            garbage = np.isnan(num) & (col != "")
            if garbage.any():
                bad.add(
                    path,
                    lines[garbage & ok],
                    [f"integer field I{j + 1} is not a number: {v!r}" for v in col[garbage & ok]],
                )
                ok &= ~garbage
            ints[:, j] = num
        badlabel = ok & ~((label == 0) | (label == 1))
        if badlabel.any():
            bad.add(
                path,
                lines[badlabel],
                [f"label {v!r} is not 0 or 1" for v in table[badlabel, 0]],
            )
            ok &= ~badlabel
        if not ok.any():
            continue
        n = int(ok.sum())
        keys = np.empty((n, CRITEO_INT + CRITEO_CAT), dtype=np.uint64)
        vals = ints[ok]
        for j in range(CRITEO_INT):
            keys[:, j] = hash_field(j, bucketize_log(vals[:, j]))
        for j in range(CRITEO_CAT):
            keys[:, CRITEO_INT + j] = hash_field(
                CRITEO_INT + j, hash_strings(table[ok, 1 + CRITEO_INT + j])
            )
        dense = np.log1p(np.where(np.isfinite(vals) & (vals > 0), vals, 0.0)).astype(np.float32)
        yield CTRBatch(keys, dense, label[ok].astype(np.float32))


def _io(block: bytes) -> io.BytesIO:
    return io.BytesIO(block)


@dataclass(frozen=True)
class SyntheticCriteo:
    """Synthetic (generated) data in Criteo's format, with a known ground-truth model.

    Categorical values follow a power law (Zipf, exponent ``zipf``); each (field, value) has a
    true weight (most of them zero), each integer field a weight per log bucket; the label is drawn
    from the logistic model of their sum. ``optimal_auc`` is the AUC of the true probabilities.

    Example:
        gen = SyntheticCriteo(examples=10_000)
        gen.write_tsv("synthetic_criteo.tsv")         # Criteo's TSV layout
        train, test = gen.make()                      # or CTRBatches directly
    """

    examples: int = 100_000
    vocab: int = 10_000
    zipf: float = 1.2
    density: float = 0.3
    scale: float = 0.6
    test_fraction: float = 0.2
    seed: int = 0

    def _raw(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(categorical value ids, integer fields with NaN, labels, true probabilities)."""
        rng = np.random.default_rng(self.seed)
        n = self.examples
        cats = np.minimum(rng.zipf(self.zipf, size=(n, CRITEO_CAT)), self.vocab) - 1
        ints = np.floor(rng.lognormal(1.0, 1.5, size=(n, CRITEO_INT)))
        ints[rng.random((n, CRITEO_INT)) < 0.2] = np.nan
        truth = np.random.default_rng(self.seed + 1)
        w_cat = truth.normal(0.0, self.scale, size=(CRITEO_CAT, self.vocab)) * (
            truth.random((CRITEO_CAT, self.vocab)) < self.density
        )
        w_int = truth.normal(0.0, self.scale / 2, size=(CRITEO_INT, 64))
        buckets = np.minimum(bucketize_log(ints), 63).astype(np.int64)
        buckets[np.isnan(ints)] = 63
        logit = w_cat[np.arange(CRITEO_CAT)[None, :], cats].sum(axis=1)
        logit += w_int[np.arange(CRITEO_INT)[None, :], buckets].sum(axis=1)
        logit -= 1.0
        p = 1.0 / (1.0 + np.exp(-logit))
        y = (rng.random(n) < p).astype(np.float32)
        return cats, ints, y, p

    @property
    def optimal_auc(self) -> float:
        """The test AUC of the true model (what no learner can beat, up to noise)."""
        from paramserver.data.evaluate import auc

        _, _, y, p = self._raw()
        n_test = int(self.examples * self.test_fraction)
        return auc(y[:n_test], p[:n_test])

    def _hex(self, cats: np.ndarray) -> np.ndarray:
        codes = splitmix64(
            cats.astype(np.uint64) * np.uint64(CRITEO_CAT) + np.arange(CRITEO_CAT, dtype=np.uint64),
            np.uint64(0),
        )
        return np.char.mod("%08x", (codes & np.uint64(0xFFFFFFFF)).astype(np.int64))

    def write_tsv(self, path: str | Path) -> Path:
        """Write every example as Criteo TSV (label, 13 integers, 26 hex categoricals)."""
        import pandas as pd

        cats, ints, y, _ = self._raw()
        cols: dict[str, object] = {"label": y.astype(np.int64)}
        for j in range(CRITEO_INT):
            cols[f"I{j + 1}"] = pd.array(ints[:, j], dtype="Int64")
        hexes = self._hex(cats)
        for j in range(CRITEO_CAT):
            cols[f"C{j + 1}"] = hexes[:, j]
        out = Path(path)
        pd.DataFrame(cols).to_csv(out, sep="\t", header=False, index=False, na_rep="")
        return out

    def make(self) -> tuple[CTRBatch, CTRBatch]:
        """(train, test) CTRBatches, hashed exactly as :func:`read_criteo` hashes the TSV."""
        cats, ints, y, _ = self._raw()
        hexes = self._hex(cats)
        keys = np.empty((len(y), CRITEO_INT + CRITEO_CAT), dtype=np.uint64)
        for j in range(CRITEO_INT):
            keys[:, j] = hash_field(j, bucketize_log(ints[:, j]))
        for j in range(CRITEO_CAT):
            keys[:, CRITEO_INT + j] = hash_field(CRITEO_INT + j, hash_strings(hexes[:, j]))
        dense = np.log1p(np.where(np.isfinite(ints) & (ints > 0), ints, 0.0)).astype(np.float32)
        batch = CTRBatch(keys, dense, y)
        n_test = int(self.examples * self.test_fraction)
        if not 0 < n_test < len(y):
            raise ConfigError(f"test_fraction {self.test_fraction} leaves no train or test data")
        return batch.take(slice(n_test, None)), batch.take(slice(0, n_test))
