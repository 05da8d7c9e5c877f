"""Read text files as blocks of whole lines, with line numbers, and account for bad lines.

Every reader in :mod:`paramserver.data` stands on :func:`line_blocks`: it reads a file (plain,
``.gz`` or ``.bz2``) in blocks of about ``block_bytes``, cut at line ends, and says which line
number each block starts at. Parsing then works on a whole block at once (NumPy, pandas), never
on one line at a time, and a bad line is still reported as ``file:line``.

Bad lines are never silent: :class:`BadLines` counts them, keeps the first few, and either raises
:class:`~paramserver.errors.DataError` at the first one (``on_error="raise"``, the default) or
lets the reader skip them (``on_error="skip"``), after which ``report()`` says how many.
"""

from __future__ import annotations

import bz2
import gzip
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from paramserver.errors import ConfigError, DataError

__all__ = ["BadLines", "good_lines", "line_blocks", "line_index", "open_data", "split_fields"]

log = logging.getLogger(__name__)

BLOCK_BYTES = 8 << 20
NL, CR = 10, 13


def open_data(path: str | Path) -> IO[bytes]:
    """Open a data file for binary reading, decompressing ``.gz`` and ``.bz2`` on the fly.

    Example:
        with open_data("day_0.gz") as f: head = f.read(100)
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    if p.suffix == ".gz":
        return gzip.open(p, "rb")  # type: ignore[return-value]
    if p.suffix == ".bz2":
        return bz2.open(p, "rb")
    return open(p, "rb")


@dataclass
class BadLines:
    """Counts malformed lines of one read; raises at the first unless ``on_error="skip"``.

    Example:
        bad = BadLines("skip"); rows = list(read_criteo(path, bad=bad)); print(bad.report())
    """

    on_error: str = "raise"
    count: int = 0
    first: list[str] = field(default_factory=list)
    keep: int = 10

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def add(self, path: str | Path, lines: np.ndarray, reasons: list[str] | str) -> None:
        """Record bad ``lines`` (1-based numbers) of ``path``; raise if the policy is fatal."""
        if len(lines) == 0:
            return
        why = [reasons] * len(lines) if isinstance(reasons, str) else reasons
        msgs = [f"{path}:{int(n)}: {r}" for n, r in zip(lines[: self.keep], why, strict=False)]
        if self.on_error == "raise":
            raise DataError(
                f"malformed input: {msgs[0]} (pass on_error='skip' / --skip-bad-lines to skip "
                "and count such lines)"
            )
        self.count += len(lines)
        room = self.keep - len(self.first)
        if room > 0:
            self.first.extend(msgs[:room])
        for m in msgs[:room]:
            log.warning("skipped %s", m)

    def report(self) -> str:
        """One line: how many lines were skipped and the first of them."""
        if not self.count:
            return "no malformed lines"
        more = f" (first: {self.first[0]})" if self.first else ""
        return f"{self.count} malformed line(s) skipped{more}"


def line_blocks(
    path: str | Path,
    *,
    block_bytes: int = BLOCK_BYTES,
    start: int = 0,
    stop: int | None = None,
    first_line: int = 1,
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(number of the first line, block)``: whole lines, each ending in ``\\n``.

    ``start``/``stop`` restrict the read to a byte range that begins at a line start (as
    returned by :func:`line_index`); ``first_line`` is the number of the line at ``start``.

    Example:
        for first, block in line_blocks("train.txt"): ...
    """
    if block_bytes < 1:
        raise ConfigError(f"block_bytes must be positive, got {block_bytes}")
    with open_data(path) as f:
        if start:
            f.seek(start)
        left = None if stop is None else stop - start
        line = first_line
        carry = b""
        while True:
            want = block_bytes if left is None else min(block_bytes, left)
            chunk = f.read(want) if want > 0 else b""
            if left is not None:
                left -= len(chunk)
            if not chunk:
                if carry:
                    yield line, carry + b"\n"
                return
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            yield line, block
            line += block.count(b"\n")


def line_index(
    path: str | Path, chunk_bytes: int = 64 << 20, *, header: bool = False
) -> list[tuple[int, int, int]]:
    """Cut an uncompressed file into chunks of whole lines: ``[(start, stop, first_line)]``.

    One pass that counts newlines (vectorized); the chunks are what the coordinator leases out.
    A compressed file cannot be entered in the middle and is one chunk. With ``header`` the first
    line is left out of every chunk.

    Example:
        line_index("train.txt", 1 << 20)  # [(0, 1048601, 1), (1048601, ...), ...]
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    size = p.stat().st_size
    first_start, first_no = 0, 1
    with open_data(p) as f:
        if header:
            first_start, first_no = len(f.readline()), 2
    if p.suffix in (".gz", ".bz2"):
        return [(first_start, -1, first_no)] if size else []
    chunks: list[tuple[int, int, int]] = []
    with open(p, "rb") as f:
        start, line = first_start, first_no
        while start < size:
            f.seek(start + chunk_bytes)
            f.readline()  # finish the line that crosses the cut
            stop = min(f.tell(), size)
            if stop <= start:
                stop = size
            f.seek(start)
            lines = _count_lines(f, stop - start)
            chunks.append((start, stop, line))
            start, line = stop, line + lines
    return chunks


def _count_lines(f: IO[bytes], n: int) -> int:
    count = 0
    while n > 0:
        buf = f.read(min(n, BLOCK_BYTES))
        if not buf:
            break
        n -= len(buf)
        count += buf.count(b"\n")
    return count


def split_fields(
    block: bytes, sep: int, expect: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Locate the lines of ``block`` and count their fields, without a loop over lines.

    Returns ``(line_starts, line_ends, field_counts)``: byte offsets (end excludes the ``\\n``
    and a ``\\r`` before it) and the number of ``sep``-separated fields of each line (0 for a
    blank line).

    Example:
        starts, ends, n = split_fields(b"1\\t2\\n3\\n", ord("\\t"))   # n == [2, 1]
    """
    buf = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(buf == NL)
    starts = np.empty_like(ends)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    ends = ends - (buf[np.maximum(ends - 1, 0)] == CR) * (ends > starts)
    seps = np.flatnonzero(buf == sep)
    counts = np.bincount(np.searchsorted(ends, seps), minlength=len(ends))[: len(ends)] + 1
    counts[ends == starts] = 0
    return starts, ends, counts


def good_lines(
    block: bytes, first: int, sep: int, fields: int, bad: BadLines, path: str | Path, kind: str = ""
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The lines of ``block`` (its first is line number ``first``) that hold ``fields``
    ``sep``-separated fields: blank lines are passed over, the others told to ``bad`` as
    ``path:line`` ("expected N {kind}fields, found M").

    Returns ``(line_starts, line_ends, line_numbers, keep)`` of every line, ``keep`` the mask
    of the good ones.

    Example:
        starts, ends, numbers, keep = good_lines(block, 1, ord("\t"), 40, bad, "day_0")
    """
    starts, ends, counts = split_fields(block, sep)
    numbers = first + np.arange(len(starts))
    blank = counts == 0
    wrong = ~blank & (counts != fields)
    if wrong.any():
        bad.add(
            path,
            numbers[wrong],
            [f"expected {fields} {kind}fields, found {c}" for c in counts[wrong]],
        )
    return starts, ends, numbers, ~blank & ~wrong


def keep_lines(block: bytes, starts: np.ndarray, ends: np.ndarray, keep: np.ndarray) -> bytes:
    """The lines of ``block`` selected by ``keep`` (a bool mask), each ending in ``\\n``."""
    if keep.all() and (len(starts) == 0 or (ends[-1] + 1 == len(block))):
        return block
    buf = np.frombuffer(block, dtype=np.uint8)
    lengths = np.where(keep, ends - starts + 1, 0)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    idx = np.arange(int(lengths.sum())) + offsets
    out = buf[idx].copy()
    out[np.cumsum(lengths[keep]) - 1] = NL  # a \r before the \n becomes the line end
    return bytes(out.tobytes())
