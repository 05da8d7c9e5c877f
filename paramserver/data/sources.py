"""A user's data file as training parts: what ``--data KIND:PATH`` of the ready programs reads.

KIND is ``criteo`` (Criteo TSV), ``libsvm`` (``label idx:value ...``), ``csv`` (a header line,
comma-separated) or ``parquet``. The file is cut into parts: chunks of whole lines (about
``part_bytes`` each), or a Parquet file's row groups. Workers are leased parts
(``client.leases``) and read only those, block by block: the file never has to fit in memory.
The last tenth of the parts is the test set, unless a test file is given.

Every source yields :class:`~paramserver.data.ctr.CTRBatch` (one key per field): a libsvm row
is cut or padded to ``fields`` keys (a missing position gets its own key, like a missing
value); a libsvm value other than 1 is folded into its key as a signed-log bucket. CSV and
Parquet columns are categorical (hashed) or numeric (``dense``, and bucketized into a key);
without ``categorical``/``numeric`` a column is numeric if the first rows say it is a number.

Example:
    src = FileData("criteo:day_0.tsv", workers=4)
    for part in client.leases(src.name, epoch, len(src)):
        for batch in src.batches(part, rows=512): ...
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paramserver.data.ctr import CTRBatch, read_criteo
from paramserver.data.formats import (
    SparseBatch,
    bucketize_signed_log,
    read_libsvm,
    read_table,
)
from paramserver.data.hashing import hash_field
from paramserver.data.lines import BadLines, line_index
from paramserver.errors import ConfigError, DataError

__all__ = ["KINDS", "FileData", "Part", "parse_data"]

log = logging.getLogger(__name__)

KINDS = ("criteo", "libsvm", "csv", "parquet")
_WHAT = {
    "criteo": "Criteo TSV (label, 13 integers, 26 categoricals, tab-separated)",
    "libsvm": "libsvm ('label index:value ...')",
    "csv": "CSV with a header line and a label column",
    "parquet": "Parquet with a label column",
}
_PAD_FIELD = 1 << 21  # the field number of libsvm's padding keys: apart from any column's


def parse_data(spec: str) -> tuple[str, Path]:
    """``"libsvm:train.txt"`` -> ``("libsvm", Path("train.txt"))``; ConfigError if malformed.

    Example:
        kind, path = parse_data("criteo:day_0.tsv")
    """
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise ConfigError(
            f"--data {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)}"
        )
    return kind, Path(path)


@dataclass(frozen=True)
class Part:
    """One part of a data file: a byte range of whole lines, or a Parquet row group."""

    path: Path
    start: int
    stop: int | None
    first_line: int
    rows: int  # lines in the range (blank and malformed ones included), or the group's rows
    group: int = -1


def _line_parts(path: Path, part_bytes: int, header: bool) -> list[Part]:
    chunks = line_index(path, part_bytes, header=header)
    if not chunks:
        return []
    start, stop, first = chunks[-1]
    end = first + _count_lines(path, start, None if stop < 0 else stop)  # the last part's end
    nexts = [c[2] for c in chunks[1:]] + [end]
    return [
        Part(path, a, None if b < 0 else b, f, n - f)
        for (a, b, f), n in zip(chunks, nexts, strict=True)
    ]


def _count_lines(path: Path, start: int, stop: int | None) -> int:
    """Lines in a byte range (a last line without its newline counted)."""
    from paramserver.data.lines import open_data

    count, last, left = 0, b"\n", None if stop is None else stop - start
    with open_data(path) as f:
        f.seek(start)
        while left is None or left > 0:
            buf = f.read(8 << 20 if left is None else min(8 << 20, left))
            if not buf:
                break
            if left is not None:
                left -= len(buf)
            count += buf.count(b"\n")
            last = buf[-1:]
    return count + (last != b"\n")


def _parquet_parts(path: Path) -> list[Part]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    meta = pq.ParquetFile(path).metadata
    return [
        Part(path, 0, None, 0, meta.row_group(g).num_rows, g) for g in range(meta.num_row_groups)
    ]


class FileData:
    """A data file (``KIND:PATH``) cut into training parts and test parts; see the module doc.

    ``workers`` only sizes the automatic parts (``part_bytes=0``: about 8 parts per worker,
    4 KiB to 64 MiB each), so that every worker has parts to read.

    Example:
        src = FileData("csv:clicks.csv", label="click", workers=4)
        len(src), src.test_rows
    """

    def __init__(
        self,
        spec: str,
        *,
        test: str | Path | None = None,
        label: str = "label",
        categorical: Sequence[str] | None = None,
        numeric: Sequence[str] | None = None,
        fields: int = 0,
        part_bytes: int = 0,
        workers: int = 1,
        bad: BadLines | None = None,
    ) -> None:
        self.kind, self.path = parse_data(spec)
        self.name = f"{self.kind}:{self.path.name}"
        self.bad = bad or BadLines("skip")
        self.label = label
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such data file")
        if test is not None and not Path(test).is_file():
            raise DataError(f"{test}: no such test file")
        size = self.path.stat().st_size
        if part_bytes <= 0:
            part_bytes = min(64 << 20, max(4 << 10, size // max(10, 8 * workers) + 1))
        self.part_bytes = part_bytes
        parts = self._parts(self.path)
        if test is not None:
            self.train, self.test = parts, self._parts(Path(test))
        elif len(parts) < 2:
            raise ConfigError(
                f"{self.path} is a single part (compressed, one Parquet row group, or tiny), so no "
                "test set can be held out of it: give a test file (--test PATH)"
            )
        else:
            n_test = max(1, len(parts) // 10)
            self.train, self.test = parts[:-n_test], parts[-n_test:]
        self.columns: tuple[list[str], list[str]] = ([], [])
        if self.kind in ("csv", "parquet"):
            self.columns = self._columns(categorical, numeric)
        self.fields = fields
        self.shape = (0, 0)  # (keys, dense values) per example, known after probe()
        self._cut_rows = 0

    def __len__(self) -> int:
        return len(self.train)

    @property
    def train_rows(self) -> int:
        """Lines (rows) of the training parts, malformed ones included."""
        return sum(p.rows for p in self.train)

    @property
    def test_rows(self) -> int:
        return sum(p.rows for p in self.test)

    def describe(self) -> str:
        return f"{self.path} ({self.kind}, {len(self.train)} training parts)"

    def _parts(self, path: Path) -> list[Part]:
        if self.kind == "parquet":
            return _parquet_parts(path)
        return _line_parts(path, self.part_bytes, header=self.kind == "csv")

    def _columns(
        self, categorical: Sequence[str] | None, numeric: Sequence[str] | None
    ) -> tuple[list[str], list[str]]:
        import pandas as pd

        if self.kind == "parquet":
            import pyarrow.parquet as pq

            head = next(pq.ParquetFile(self.path).iter_batches(batch_size=1000)).to_pandas()
        else:
            head = pd.read_csv(self.path, nrows=1000)
        names = [str(c) for c in head.columns]
        if self.label not in names:
            raise DataError(
                f"{self.path}: no label column {self.label!r} (--label); it has {names}"
            )
        given = [*(categorical or ()), *(numeric or ())]
        unknown = [c for c in given if c not in names]
        if unknown:
            raise DataError(f"{self.path}: no column(s) {unknown}; it has {names}")
        rest = [c for c in names if c != self.label and c not in given]
        if categorical is None and numeric is None:
            num = [c for c in rest if pd.api.types.is_numeric_dtype(head[c])]
            return [c for c in rest if c not in num], num
        return list(categorical or ()), list(numeric or ())

    def read(self, part: Part, *, block_bytes: int = 8 << 20) -> Iterator[CTRBatch]:
        """The valid examples of ``part``, block by block (malformed lines go to ``self.bad``)."""
        at = {"start": part.start, "stop": part.stop, "first_line": part.first_line}
        if self.kind == "criteo":
            yield from read_criteo(
                part.path, bad=self.bad, block_bytes=block_bytes, start=part.start,
                stop=part.stop, first_line=part.first_line,
            )  # fmt: skip
        elif self.kind == "libsvm":
            for sb in read_libsvm(
                part.path, bad=self.bad, block_bytes=block_bytes, start=part.start,
                stop=part.stop, first_line=part.first_line,
            ):  # fmt: skip
                yield self._fixed(sb)
        else:
            cat, num = self.columns
            where: dict[str, Any] = {"row_groups": [part.group]} if self.kind == "parquet" else at
            yield from read_table(part.path, label=self.label, categorical=cat, numeric=num,
                                  bad=self.bad, block_bytes=block_bytes, **where)  # fmt: skip

    def batches(self, part: Part, rows: int) -> Iterator[CTRBatch]:
        """The examples of ``part`` in batches of ``rows`` (the last one shorter)."""
        held: list[CTRBatch] = []
        n = 0
        for block in self.read(part):
            held.append(block)
            n += len(block)
            if n < rows:
                continue
            data = CTRBatch.concat(held) if len(held) > 1 else held[0]
            cut = len(data) - len(data) % rows
            for i in range(0, cut, rows):
                yield data.take(slice(i, i + rows))
            held = [data.take(slice(cut, None))] if cut < len(data) else []
            n = len(data) - cut
        if n:
            yield CTRBatch.concat(held) if len(held) > 1 else held[0]

    def test_batches(self, rows: int = 16384) -> Iterator[CTRBatch]:
        """The test parts' examples."""
        for part in self.test:
            yield from self.batches(part, rows)

    def probe(self, lines: int = 1 << 20) -> None:
        """Raise one clear DataError if the first block of the first part has no valid line
        (the file is not of its KIND), instead of training on nothing."""
        first = self.train[0] if self.train else None
        if first is None:
            raise DataError(f"{self.path}: no data")
        bad = BadLines("skip", keep=1)
        saved, self.bad = self.bad, bad
        logger = logging.getLogger("paramserver.data.lines")
        level = logger.level
        logger.setLevel(logging.ERROR)  # the one error below says it; no warning per line
        try:
            found = next((b for b in self.read(first, block_bytes=lines) if len(b)), None)
        finally:
            self.bad = saved
            logger.setLevel(level)
        if found is not None:
            self.shape = (found.fields, int(found.dense.shape[1]))
            return
        if bad.count:
            raise DataError(
                f"no valid line in {self.path}; is it {_WHAT[self.kind]}? "
                f"({bad.count} malformed line(s), first: {bad.first[0] if bad.first else '?'})"
            )
        raise DataError(f"{self.path}: no example in its first part")

    def _fixed(self, sb: SparseBatch) -> CTRBatch:
        """A libsvm batch as ``fields`` keys per example (see the module doc)."""
        lengths = np.diff(sb.indptr)
        if not self.fields and len(sb):
            self.fields = max(1, int(lengths.max(initial=1)))
        width = max(self.fields, 1)
        n = len(sb)
        keys = np.repeat(
            hash_field(_PAD_FIELD, np.arange(width, dtype=np.uint64))[None, :], n, axis=0
        )
        row = np.repeat(np.arange(n), lengths)
        pos = np.arange(len(sb.keys)) - np.repeat(sb.indptr[:-1], lengths)
        vk = np.where(
            sb.values == 1,
            sb.keys,
            hash_field(1, sb.keys ^ bucketize_signed_log(sb.values)),
        )
        fit = pos < width
        keys[row[fit], pos[fit]] = vk[fit]
        cut = int((lengths > width).sum())
        if cut:
            self._cut_rows += cut
            log.warning(
                "%s: %d example(s) have more than %d features; the extra ones are dropped "
                "(--fields sets the width)", self.path, cut, width,
            )  # fmt: skip
        return CTRBatch(keys, np.zeros((n, 0), np.float32), sb.y)


def part_steps(parts: Sequence[Part], rows: int) -> int:
    """Batches of ``rows`` the parts make at most (every line a valid example)."""
    return sum(math.ceil(p.rows / rows) for p in parts)
