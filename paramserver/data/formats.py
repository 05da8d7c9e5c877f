"""Readers for libsvm/svmlight, CSV and Parquet with named columns, and plain text.

All stream in blocks with bounded memory and parse a block at once (NumPy / pandas / pyarrow);
bad lines go to a :class:`~paramserver.data.lines.BadLines` with their file and line number.
CSV lines are split on the separator without quoting rules (a quoted separator would read as a
field boundary, and the line as malformed): convert such files to Parquet.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paramserver.data.ctr import CTRBatch
from paramserver.data.hashing import hash_field, hash_strings
from paramserver.data.lines import BadLines, good_lines, keep_lines, line_blocks, open_data
from paramserver.errors import ConfigError, DataError

__all__ = ["SparseBatch", "bucketize_signed_log", "read_libsvm", "read_table", "read_text"]


@dataclass(frozen=True)
class SparseBatch:
    """Examples with a variable number of features, in CSR form: example ``i`` has the keys
    ``keys[indptr[i]:indptr[i+1]]`` with ``values`` alongside.

    Example:
        SparseBatch(np.array([0, 2]), np.array([3, 9], np.uint64), np.ones(2, np.float32),
                    np.array([1.0], np.float32))
    """

    indptr: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @staticmethod
    def from_ctr(batch: CTRBatch) -> SparseBatch:
        """A CTRBatch's keys as CSR rows of equal length with value 1."""
        n, f = batch.keys.shape
        return SparseBatch(
            np.arange(0, n * f + 1, max(f, 1), dtype=np.int64)[: n + 1],
            batch.keys.reshape(-1),
            np.ones(n * f, dtype=np.float32),
            batch.y,
        )

    def take(self, idx: np.ndarray) -> SparseBatch:
        """The examples at the index array ``idx``."""
        lengths = np.diff(self.indptr)[idx]
        starts = self.indptr[:-1][idx]
        indptr = np.concatenate(([0], np.cumsum(lengths)))
        pos = np.repeat(starts - indptr[:-1], lengths) + np.arange(int(indptr[-1]))
        return SparseBatch(indptr, self.keys[pos], self.values[pos], self.y[idx])


def _numbers(tokens: np.ndarray) -> np.ndarray:
    import pandas as pd

    return np.asarray(pd.to_numeric(tokens.astype(str), errors="coerce"), dtype=np.float64)


def read_libsvm(
    path: str | Path,
    *,
    bad: BadLines | None = None,
    signed_labels: bool = False,
    block_bytes: int = 8 << 20,
    start: int = 0,
    stop: int | None = None,
    first_line: int = 1,
) -> Iterator[SparseBatch]:
    """Stream a libsvm/svmlight file (``label idx:value ...``) as SparseBatches.

    Keys are ``hash_field(0, idx)``. Labels must be 0 or 1; with ``signed_labels`` -1/+1 are read
    as 0/1. ``qid:`` tokens are ignored. ``start``/``stop``/``first_line`` read one part of the
    file (see :func:`~paramserver.data.lines.line_blocks`).

    Example:
        for b in read_libsvm("a9a.txt", signed_labels=True): ...
    """
    bad = bad or BadLines()
    for first, block in line_blocks(
        path, block_bytes=block_bytes, start=start, stop=stop, first_line=first_line
    ):
        tokens = np.array(block.replace(b"\n", b" \x01 ").split(), dtype=np.bytes_)
        end = tokens == b"\x01"
        line = np.cumsum(end) - end  # block-relative line of each token
        nlines = int(end.sum())
        head = np.concatenate(([True], end[:-1])) & ~end
        feat = ~end & ~head & ~np.char.startswith(tokens, b"qid:")
        label = np.full(nlines, np.nan)
        label[line[head]] = _numbers(tokens[head])
        has = np.zeros(nlines, dtype=bool)
        has[line[head]] = True
        parts = np.char.partition(tokens[feat], b":").reshape(-1, 3)
        idx_s, sep, val_s = parts[:, 0], parts[:, 1], parts[:, 2]
        idx = _numbers(idx_s)
        val = _numbers(val_s)
        tok_bad = (sep != b":") | np.isnan(idx) | (idx < 0) | (idx != np.floor(idx)) | np.isnan(val)
        line_bad = np.zeros(nlines, dtype=bool)
        line_bad[line[feat][tok_bad]] = True
        numbers = first + np.arange(nlines)
        if signed_labels:
            label = np.where(label == -1, 0.0, label)
        ok_label = (label == 0) | (label == 1)
        wrong = has & ~line_bad & ~ok_label
        if line_bad.any() or wrong.any():
            rows = np.flatnonzero(line_bad | wrong)  # in line order, so the first is reported
            why = np.where(
                line_bad[rows],
                "expected 'label index:value ...' with numbers",
                np.char.add("label ", np.char.add(label[rows].astype(str), " is not 0 or 1")),
            )
            bad.add(path, numbers[rows], why.tolist())
        keep = has & ~line_bad & ok_label
        fkeep = keep[line[feat]]
        rows_of = line[feat][fkeep]
        lengths = np.bincount(rows_of, minlength=nlines)[keep]
        yield SparseBatch(
            np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
            hash_field(0, idx[fkeep].astype(np.uint64)),
            val[fkeep].astype(np.float32),
            label[keep].astype(np.float32),
        )


def bucketize_signed_log(values: np.ndarray, per_unit: float = 4.0) -> np.ndarray:
    """Buckets ``floor(sign(v) * log1p(|v|) * per_unit)`` as uint64 ids; NaN is its own bucket.

    Example:
        bucketize_signed_log(np.array([0.0, 1.0, -50.0, np.nan]))
    """
    v = np.asarray(values, dtype=np.float64)
    b = np.floor(np.sign(v) * np.log1p(np.abs(v)) * per_unit)
    out = np.where(np.isfinite(b), b + (1 << 20), float(1 << 30)).astype(np.int64)
    return out.astype(np.uint64)


def _to_batch(
    frame: dict[str, np.ndarray],
    label: str,
    categorical: Sequence[str],
    numeric: Sequence[str],
    bucketize: bool,
) -> CTRBatch:
    n = len(frame[label])
    cols: list[np.ndarray] = [
        hash_field(j, hash_strings(frame[c])) for j, c in enumerate(categorical)
    ]
    dense = np.zeros((n, len(numeric)), dtype=np.float32)
    for j, c in enumerate(numeric):
        v = frame[c].astype(np.float64)
        dense[:, j] = np.where(np.isfinite(v), v, 0.0)
        if bucketize:
            cols.append(hash_field(len(categorical) + j, bucketize_signed_log(v)))
    keys = np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.uint64)
    return CTRBatch(keys, dense, frame[label].astype(np.float32))


def read_table(
    path: str | Path,
    *,
    label: str,
    categorical: Sequence[str] = (),
    numeric: Sequence[str] = (),
    bucketize: bool = True,
    sep: str = ",",
    bad: BadLines | None = None,
    block_bytes: int = 8 << 20,
    batch_rows: int = 65536,
    start: int | None = None,
    stop: int | None = None,
    first_line: int = 2,
    row_groups: Sequence[int] | None = None,
) -> Iterator[CTRBatch]:
    """Stream a CSV file (with a header line) or a Parquet file as CTRBatches.

    Categorical columns are hashed as (column, string); numeric columns go to ``dense`` and,
    with ``bucketize``, also to ``keys`` as signed-log buckets. The label must be 0 or 1.

    One part of the file: a CSV's byte range ``start``/``stop`` of whole lines after the header
    (``first_line`` is the number of the line at ``start``), or a Parquet file's ``row_groups``.

    Example:
        for b in read_table("clicks.parquet", label="click", categorical=["site", "ad"],
                            numeric=["price"]): ...
    """
    import pandas as pd

    bad = bad or BadLines()
    p = Path(path)
    wanted = [label, *categorical, *numeric]
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"{p}: a column is named twice in {wanted}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        if not p.is_file():
            raise DataError(f"{p}: no such data file")
        pf = pq.ParquetFile(p)
        missing = [c for c in wanted if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{p}: no column(s) {missing}; it has {pf.schema_arrow.names}")
        groups = list(range(pf.num_row_groups)) if row_groups is None else list(row_groups)
        meta = pf.metadata
        row = sum(meta.row_group(g).num_rows for g in range(groups[0])) if groups else 0
        for rb in pf.iter_batches(batch_size=batch_rows, columns=wanted, row_groups=groups):
            frame = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in wanted}
            frame[label] = _numbers(frame[label].astype(str))
            for c in categorical:
                frame[c] = frame[c].astype(str).astype(object)
            for c in numeric:
                frame[c] = _numbers(frame[c].astype(str))
            ok = (frame[label] == 0) | (frame[label] == 1)
            if not ok.all():
                bad.add(
                    p,
                    row + np.flatnonzero(~ok) + 1,
                    [f"row: label {v!r} is not 0 or 1" for v in frame[label][~ok].tolist()],
                )
            row += rb.num_rows
            yield _to_batch(
                {c: v[ok] for c, v in frame.items()}, label, categorical, numeric, bucketize
            )
        return
    with open_data(p) as f:
        header_line = f.readline()
    names = header_line.decode().rstrip("\r\n").split(sep)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"{p}:1: header has no column(s) {missing}; it has {names}")
    if start is None:
        start = len(header_line) if p.suffix not in (".gz", ".bz2") else 0
        skip_header = start == 0
    else:
        skip_header = False
    sep_byte = sep.encode()
    if len(sep_byte) != 1:
        raise ConfigError(f"sep must be one byte, got {sep!r}")
    for first, block in line_blocks(
        p, block_bytes=block_bytes, start=start, stop=stop, first_line=first_line
    ):
        if skip_header:  # a compressed file cannot seek past its header
            block = block[block.index(b"\n") + 1 :]
            skip_header = False
        starts, ends, numbers, keep = good_lines(block, first, sep_byte[0], len(names), bad, p)
        if not keep.any():
            continue
        lines = numbers[keep]
        df = pd.read_csv(
            io.BytesIO(keep_lines(block, starts, ends, keep)),
            sep=sep,
            header=None,
            names=names,
            usecols=wanted,
            dtype=str,
            keep_default_na=False,
            engine="c",
        )
        frame = {c: df[c].to_numpy(dtype=object) for c in wanted}
        ok = np.ones(len(df), dtype=bool)
        for c in numeric:
            raw = frame[c]
            v = _numbers(raw)
            garbage = np.isnan(v) & (raw != "")
            if garbage.any():
                bad.add(p, lines[garbage & ok], f"column {c!r} is not a number")
                ok &= ~garbage
            frame[c] = v
        y = _numbers(frame[label])
        wrong_label = ok & ~((y == 0) | (y == 1))
        if wrong_label.any():
            bad.add(
                p,
                lines[wrong_label],
                [f"label {v!r} is not 0 or 1" for v in frame[label][wrong_label].tolist()],
            )
            ok &= ~wrong_label
        frame[label] = y
        yield _to_batch(
            {c: v[ok] for c, v in frame.items()}, label, categorical, numeric, bucketize
        )


_WORD = re.compile(rb"[a-z][a-z0-9']*")
_MARKUP = re.compile(
    rb"<[^>\n]*>|\{\{[^}\n]*\}\}|\[\[(?:[^|\]\n]*\|)?|\]\]|&[a-z]+;|https?://\S+|'''?|==+|\|"
)


def read_text(
    path: str | Path, *, markup: bool = False, block_bytes: int = 8 << 20
) -> Iterator[np.ndarray]:
    """Stream a text file as arrays of lower-case word tokens (``bytes``), one array per block.

    With ``markup`` XML tags, wiki links and templates and HTML entities are removed first (a
    rough cleaning for Wikipedia dumps, done with one regular expression per block).

    Example:
        words = np.concatenate(list(read_text("lee_background.cor")))
    """
    for _, block in line_blocks(path, block_bytes=block_bytes):
        text = block.lower()
        if markup:
            text = _MARKUP.sub(b" ", text)
        words = _WORD.findall(text)
        yield np.array(words, dtype=np.bytes_) if words else np.empty(0, dtype="S1")
