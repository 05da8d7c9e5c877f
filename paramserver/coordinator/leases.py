"""Data leases: each part of a data set is handed out once per epoch, whoever survives.

Every worker of a data set asks for the next part of an epoch (the wire and the messages
still call parts *shards*); the parts go out in an order shuffled by (data set, epoch). A
lease is held by its worker's rank until completed; the leases of a worker that dies or
leaves go back to the queue and are handed out next, so an epoch covers every part. The
books of the last two epochs of each data set are kept.

A book is three arrays over its parts (the shuffled order, the holder, done), about 9 bytes a
part, and :class:`~paramserver.config.Limits` bounds the parts of all books, the books and the
names: no request can make the coordinator keep more.

Plain state: the loop passes the messages in and sends the answers.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from paramserver.config import Limits
from paramserver.errors import ConfigError
from paramserver.wire.messages import AcquireLeaseMsg, CompleteLeaseMsg

__all__ = ["LeaseBook", "Leases"]

log = logging.getLogger(__name__)

FREE = -1  # a part no worker holds


class LeaseBook:
    """The parts of one data set in one epoch: the shuffled order still to hand out (from
    ``next``), the parts given back by lost workers (handed out first), each part's holder
    (a worker rank, or FREE) and whether it is done."""

    def __init__(self, parts: int, seed: str) -> None:
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8]))
        self.parts = parts
        self.order = rng.permutation(parts).astype(np.int32)
        self.next = 0
        self.returned: list[int] = []
        self.holder = np.full(parts, FREE, np.int32)
        self.finished = np.zeros(parts, np.bool_)

    def take(self, rank: int) -> int:
        if self.returned:
            part = self.returned.pop()
        elif self.next < self.parts:
            part = int(self.order[self.next])
            self.next += 1
        else:
            return -1
        self.holder[part] = rank
        return part

    @property
    def held(self) -> dict[int, int]:
        """Part -> the rank holding it."""
        parts = np.flatnonzero(self.holder != FREE)
        return dict(zip(parts.tolist(), self.holder[parts].tolist(), strict=True))

    @property
    def done(self) -> set[int]:
        return set(np.flatnonzero(self.finished).tolist())


class Leases:
    """The lease books of every data set and epoch, within ``limits``.

    Example:
        leases = Leases()
        part = leases.acquire({"kind": "acquire_lease", "id": 1, "dataset": "d", "epoch": 1,
                               "shards": 4, "rank": 0})
        leases.complete({"kind": "complete_lease", "id": 2, "dataset": "d", "epoch": 1,
                         "shard": part, "rank": 0})
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.books: dict[tuple[str, int], LeaseBook] = {}

    def to_record(self) -> dict[str, Any]:
        """The journal's record of every book (a compacted journal; see journal.py)."""
        return {
            "t": "leases",
            "books": [
                [name, epoch, b.parts, b.next, list(b.returned), b.holder.tolist(),
                 b.finished.tolist()]
                for (name, epoch), b in self.books.items()
            ],
        }  # fmt: skip

    def load_record(self, record: dict[str, Any]) -> None:
        """Take the books of :meth:`to_record` back (the order is the seed's again)."""
        self.books = {}
        for name, epoch, parts, nxt, returned, holder, finished in record["books"]:
            book = LeaseBook(int(parts), f"{name}/{epoch}")
            book.next, book.returned = int(nxt), [int(p) for p in returned]
            book.holder[:] = holder
            book.finished[:] = finished
            self.books[(name, int(epoch))] = book

    def _check_new(self, dataset: str, parts: int) -> None:
        lim = self.limits
        if not isinstance(parts, int) or isinstance(parts, bool) or parts < 0:
            raise ConfigError(f"data set {dataset[:64]!r}: shards must be a count >= 0")
        held = sum(b.parts for b in self.books.values())
        if held + parts > lim.lease_parts:
            raise ConfigError(
                f"data set {dataset[:64]!r} has {parts} shards, and the coordinator's lease "
                f"books hold {held} of their limit of {lim.lease_parts}: group files into "
                "fewer parts, or start the coordinator with a larger Limits(lease_parts=...)"
            )
        if len(self.books) >= lim.datasets:
            raise ConfigError(
                f"the coordinator holds lease books for {len(self.books)} data-set epochs, its "
                f"limit (Limits(datasets=...)): use fewer data-set names"
            )

    def book(self, dataset: str, epoch: int, rank: int, parts: int | None) -> LeaseBook:
        """The book of ``dataset`` in ``epoch``, opened when a worker first says how many parts
        it has (``parts``); ConfigError if none was opened, the workers' counts differ, or
        opening it would pass a limit."""
        if not isinstance(dataset, str) or len(dataset) > self.limits.name_chars:
            raise ConfigError(
                f"a data-set name must be a string of at most {self.limits.name_chars} characters"
            )
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ConfigError(f"data set {dataset!r}: the epoch must be an integer")
        key = (dataset, epoch)
        book = self.books.get(key)
        if book is None:
            if parts is None:
                raise ConfigError(
                    f"data set {dataset!r} epoch {epoch}: no lease was ever handed out"
                )
            self.books.pop((dataset, epoch - 2), None)  # keep the last two epochs
            self._check_new(dataset, parts)
            book = self.books[key] = LeaseBook(parts, f"{dataset}/{epoch}")
        elif parts is not None and parts != book.parts:
            raise ConfigError(
                f"data set {dataset!r} epoch {epoch} has {book.parts} shards, "
                f"worker[{rank}] counts {parts}: the workers disagree on the data"
            )
        return book

    def acquire(self, h: AcquireLeaseMsg) -> int:
        """The next part for worker ``h["rank"]``, now leased to it; -1 when none is left."""
        return self.book(h["dataset"], h["epoch"], h["rank"], h["shards"]).take(h["rank"])

    def complete(self, h: CompleteLeaseMsg) -> None:
        """Worker ``h["rank"]`` is done with its part ``h["shard"]``; ConfigError if that part
        is not leased to it."""
        book = self.book(h["dataset"], h["epoch"], h["rank"], None)
        part = h["shard"]
        if not (isinstance(part, int) and 0 <= part < book.parts) or (
            book.holder[part] != h["rank"]
        ):
            raise ConfigError(
                f"data set {h['dataset']!r} epoch {h['epoch']}: shard {part} is not leased to "
                f"worker[{h['rank']}]"
            )
        book.holder[part] = FREE
        book.finished[part] = True

    def requeue(self, rank: int, name: str) -> None:
        """Worker ``rank`` (``name``, for the log) died or left: its parts go back to the
        queue, handed out next."""
        for (dataset, epoch), book in self.books.items():
            lost = np.flatnonzero(book.holder == rank)
            if lost.size:
                book.holder[lost] = FREE
                book.returned.extend(lost[::-1].tolist())  # handed out next, lowest first
                log.warning(
                    "%s: leases %s of %r epoch %d go back to the queue",
                    name,
                    lost[:20].tolist(),
                    dataset,
                    epoch,
                )
