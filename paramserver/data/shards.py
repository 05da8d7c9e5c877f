"""Data sets cut into shards, handed to workers by the coordinator as leases, epoch by epoch.

A shard is a row range of an in-memory data set or a (file, chunk of whole lines) of a file set.
Every worker builds the same shard list (it is deterministic), and asks the coordinator which
shard to take next (``client.leases(name, epoch, len(shards))``), so an epoch covers every shard
exactly once whatever the number of workers, and workers can come and go between epochs without
re-splitting anything by hand.

Example:
    shards = FileShards("criteo", ["day_0.tsv"], read_criteo, chunk_bytes=64 << 20)
    for batch in shards.epoch(client, epoch=1):
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from paramserver.data.lines import line_index
from paramserver.errors import ConfigError

__all__ = ["ArrayShards", "FileShards", "LeaseSource"]

T = TypeVar("T")


class LeaseSource(Protocol):
    """What :meth:`ArrayShards.epoch` needs of a client (``paramserver.Client`` has it)."""

    def leases(self, dataset: str, epoch: int, shards: int) -> Iterator[int]: ...


class _Sized(Protocol):
    def __len__(self) -> int: ...

    def take(self, idx: slice) -> Any: ...


class ArrayShards(Generic[T]):
    """An in-memory data set (anything with ``len`` and ``take(slice)``) cut into row ranges.

    Example:
        shards = ArrayShards("ml100k/train", train, rows=8192)
        for part in shards.epoch(client, 1): ...
    """

    def __init__(self, name: str, data: T, rows: int) -> None:
        if rows < 1:
            raise ConfigError(f"rows per shard must be positive, got {rows}")
        self.name = name
        self.data = data
        n = len(data)  # type: ignore[arg-type]
        self.bounds = [(a, min(a + rows, n)) for a in range(0, n, rows)]

    def __len__(self) -> int:
        return len(self.bounds)

    def read(self, shard: int) -> T:
        a, b = self.bounds[shard]
        return self.data.take(slice(a, b))  # type: ignore[attr-defined,no-any-return]

    def epoch(self, client: LeaseSource, epoch: int) -> Iterator[T]:
        """The shards this worker is leased in ``epoch``, until none is left."""
        for shard in client.leases(self.name, epoch, len(self)):
            yield self.read(shard)

    def share(self, rank: int, workers: int) -> Iterator[T]:
        """Rows ``rank::workers``, cut to the same length for every worker, in parts of the
        shard size. For sync and bounded staleness, where every worker must run the same number
        of clocks (a worker that stops clocking early would hold the others back)."""
        n = len(self.data) // workers  # type: ignore[arg-type]
        rows = self.bounds[0][1] - self.bounds[0][0] if self.bounds else 1
        mine = self.data.take(slice(rank, rank + n * workers, workers))  # type: ignore[attr-defined]
        for a in range(0, n, rows):
            yield mine.take(slice(a, min(a + rows, n)))

    def parts(self, client: Any, epoch: int, consistency: str) -> Iterator[T]:
        """Leases under async; an equal fixed share under sync / ssp (see :meth:`share`)."""
        if consistency == "async":
            return self.epoch(client, epoch)
        return self.share(client.rank, client.num_workers)


class FileShards(Generic[T]):
    """Files cut into chunks of whole lines; ``reader(path, start=, stop=, first_line=)`` reads
    one chunk (e.g. :func:`~paramserver.data.ctr.read_criteo`) and yields batches.

    Example:
        shards = FileShards("criteo", ["day_0.tsv"], read_criteo, chunk_bytes=64 << 20)
    """

    def __init__(
        self,
        name: str,
        paths: Sequence[str | Path],
        reader: Callable[..., Iterator[T]],
        *,
        chunk_bytes: int = 64 << 20,
        **reader_args: Any,
    ) -> None:
        self.name = name
        self.reader = reader
        self.reader_args = reader_args
        self.chunks: list[tuple[Path, int, int | None, int]] = []
        for p in paths:
            for start, stop, first in line_index(p, chunk_bytes):
                self.chunks.append((Path(p), start, None if stop < 0 else stop, first))

    def __len__(self) -> int:
        return len(self.chunks)

    def read(self, shard: int) -> Iterator[T]:
        path, start, stop, first = self.chunks[shard]
        return self.reader(path, start=start, stop=stop, first_line=first, **self.reader_args)

    def epoch(self, client: LeaseSource, epoch: int) -> Iterator[T]:
        """The batches of the shards this worker is leased in ``epoch``."""
        for shard in client.leases(self.name, epoch, len(self)):
            yield from self.read(shard)
