"""Data leases: each part of a data set is handed out once per epoch, whoever survives.

Every worker of a data set asks for the next part of an epoch (the wire and the messages
still call parts *shards*); the parts go out in an order shuffled by (data set, epoch). A
lease is held by its worker's rank until completed; the leases of a worker that dies or
leaves go back to the queue and are handed out next, so an epoch covers every part. The
books of the last two epochs of each data set are kept.

Plain state: the loop passes the messages in and sends the answers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from paramserver.errors import ConfigError
from paramserver.wire.messages import AcquireLeaseMsg, CompleteLeaseMsg

__all__ = ["LeaseBook", "Leases"]

log = logging.getLogger(__name__)


@dataclass
class LeaseBook:
    """The parts of one data set in one epoch: still to hand out (the last one next), held
    (part -> worker rank), done."""

    shards: int
    todo: list[int]
    held: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)


class Leases:
    """The lease books of every data set and epoch.

    Example:
        leases = Leases()
        part = leases.acquire({"kind": "acquire_lease", "id": 1, "dataset": "d", "epoch": 1,
                               "shards": 4, "rank": 0})
        leases.complete({"kind": "complete_lease", "id": 2, "dataset": "d", "epoch": 1,
                         "shard": part, "rank": 0})
    """

    def __init__(self) -> None:
        self.books: dict[tuple[str, int], LeaseBook] = {}

    def book(self, dataset: str, epoch: int, rank: int, shards: int | None) -> LeaseBook:
        """The book of ``dataset`` in ``epoch``, opened when a worker first says how many parts
        it has (``shards``); ConfigError if none was opened, or the workers' counts differ."""
        key = (dataset, epoch)
        book = self.books.get(key)
        if book is None:
            if shards is None:
                raise ConfigError(
                    f"data set {dataset!r} epoch {epoch}: no lease was ever handed out"
                )
            order = list(range(shards))
            random.Random(f"{dataset}/{epoch}").shuffle(order)
            book = self.books[key] = LeaseBook(shards, order[::-1])
            self.books.pop((dataset, epoch - 2), None)  # keep the last two epochs
        elif shards is not None and shards != book.shards:
            raise ConfigError(
                f"data set {dataset!r} epoch {epoch} has {book.shards} shards, "
                f"worker[{rank}] counts {shards}: the workers disagree on the data"
            )
        return book

    def acquire(self, h: AcquireLeaseMsg) -> int:
        """The next part for worker ``h["rank"]``, now leased to it; -1 when none is left."""
        book = self.book(h["dataset"], h["epoch"], h["rank"], h["shards"])
        shard = book.todo.pop() if book.todo else -1
        if shard >= 0:
            book.held[shard] = h["rank"]
        return shard

    def complete(self, h: CompleteLeaseMsg) -> None:
        """Worker ``h["rank"]`` is done with its part ``h["shard"]``; ConfigError if that part
        is not leased to it."""
        book = self.book(h["dataset"], h["epoch"], h["rank"], None)
        shard = h["shard"]
        if book.held.get(shard) != h["rank"]:
            raise ConfigError(
                f"data set {h['dataset']!r} epoch {h['epoch']}: shard {shard} is not leased to "
                f"worker[{h['rank']}]"
            )
        del book.held[shard]
        book.done.add(shard)

    def requeue(self, rank: int, name: str) -> None:
        """Worker ``rank`` (``name``, for the log) died or left: its parts go back to the
        queue, handed out next."""
        for (dataset, epoch), book in self.books.items():
            lost = sorted(s for s, r in book.held.items() if r == rank)
            for shard in lost:
                del book.held[shard]
                book.todo.append(shard)  # handed out next
            if lost:
                log.warning(
                    "%s: leases %s of %r epoch %d go back to the queue", name, lost, dataset, epoch
                )
