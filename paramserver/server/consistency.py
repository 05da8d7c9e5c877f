"""Clocks and consistency on one server: when a pull may be answered, and sync aggregation.

Pure logic, no I/O. Every worker's clock is the number of ``clock()`` calls it has made. The
*live* workers are those the cluster view lists as pending or alive; ``min_clock`` is the
smallest clock among them. For a pull by a worker at clock ``c``:

* ``sync``: answered once ``min_clock >= c`` (every update of clocks < c is applied);
* ``ssp:N``: answered once ``min_clock >= c - N``;
* ``async``: answered at once.

It is served with staleness ``max(0, c - min_clock)``: the clocks of other workers' updates it
may be missing. A pull that may not be answered yet waits in :class:`DeferredPulls` until a
clock advances (or a slow worker leaves the view) and :func:`pull_ready` says yes, or until its
deadline passes.

Sync pushes are buffered per clock and per worker. When every live worker has finished clock
``c``, each worker's pushes of ``c`` are summed in the order they arrived, the workers' sums
are added in rank order, and the total is divided by the number of live workers. The order is
fixed, so the result is bitwise the same whatever the timing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numba
import numpy as np

__all__ = [
    "Clocks",
    "DeferredPull",
    "DeferredPulls",
    "SyncBuffer",
    "aggregate_dense",
    "aggregate_sparse",
    "pull_ready",
    "staleness_of",
]

INF_CLOCK = 1 << 62
T = TypeVar("T")


class Clocks:
    """Per-worker clocks and the live set.

    Example:
        clocks = Clocks(num_workers=2)
        clocks.advance(0, 1); clocks.min_clock   # 0: worker 1 is still at clock 0
    """

    def __init__(self, num_workers: int, start: int = 0) -> None:
        self.clock = [start] * num_workers
        self.live = set(range(num_workers))

    @property
    def min_clock(self) -> int:
        return min((self.clock[r] for r in self.live), default=INF_CLOCK)

    @property
    def reached(self) -> int:
        """The clock the tables stand at: ``min_clock`` while a worker is live; once none is,
        the furthest clock any worker reached (not ``INF_CLOCK``: a checkpoint asked for a
        later clock must not be labelled with a clock nobody trained to)."""
        if self.live:
            return self.min_clock
        return max(self.clock, default=0)

    def advance(self, rank: int, clock: int) -> bool:
        """Move ``rank`` to ``clock``; False (and nothing changes) unless it is ahead."""
        # a worker only moves forward; a restarted worker rejoins at the clock it reports
        if clock > self.clock[rank]:
            self.clock[rank] = clock
            return True
        return False

    def set_live(self, ranks: set[int]) -> None:
        self.live = {r for r in ranks if 0 <= r < len(self.clock)}

    def slowest(self) -> list[tuple[int, int]]:
        """(rank, clock) of the live workers at the minimum clock."""
        low = self.min_clock
        return sorted((r, self.clock[r]) for r in self.live if self.clock[r] == low)


def pull_ready(mode: str, bound: int, clock: int, min_clock: int) -> bool:
    """Whether a pull at ``clock`` of a table in ``mode`` (``bound``: ssp's N) may be answered
    while the slowest live worker is at ``min_clock``.

    Example:
        pull_ready("ssp", 2, clock=5, min_clock=3)   # True: 3 >= 5 - 2
    """
    if mode == "async":
        return True
    if mode == "sync":
        return min_clock >= clock
    return min_clock >= clock - bound


def staleness_of(clock: int, min_clock: int) -> int:
    return max(0, clock - min_clock)


@numba.njit(cache=True, nogil=True)
def _ordered_segment_sum(
    keys: np.ndarray, ranks: np.ndarray, grads: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    # Items are sorted by key (stable), so each key's items come in (rank, arrival) order.
    # Sum per (key, rank) sequentially, then add the ranks' sums in rank order.
    n = order.shape[0]
    dim = grads.shape[1]
    out_keys = np.empty(n, dtype=keys.dtype)
    out = np.empty((n, dim), dtype=grads.dtype)
    part = np.empty(dim, dtype=grads.dtype)
    u = -1
    i = 0
    while i < n:
        k = keys[order[i]]
        u += 1
        out_keys[u] = k
        first_rank = True
        j = i
        while j < n and keys[order[j]] == k:
            r = ranks[order[j]]
            src = order[j]
            for d in range(dim):
                part[d] = grads[src, d]
            j += 1
            while j < n and keys[order[j]] == k and ranks[order[j]] == r:
                src = order[j]
                for d in range(dim):
                    part[d] = part[d] + grads[src, d]
                j += 1
            if first_rank:
                for d in range(dim):
                    out[u, d] = part[d]
                first_rank = False
            else:
                for d in range(dim):
                    out[u, d] = out[u, d] + part[d]
        i = j
    return out_keys[: u + 1], out[: u + 1]


def aggregate_sparse(
    pushes: list[tuple[int, np.ndarray, np.ndarray]], num_live: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sync aggregation of sparse pushes ``[(rank, keys, grads), ...]`` in arrival order.

    Returns (unique keys, mean gradient rows) as described in the module docstring.
    """
    pushes = sorted(pushes, key=lambda p: p[0])  # stable: keeps arrival order within a rank
    keys = np.concatenate([p[1] for p in pushes])
    grads = np.concatenate([p[2] for p in pushes])
    ranks = np.concatenate([np.full(len(p[1]), p[0], dtype=np.int64) for p in pushes])
    order = np.argsort(keys, kind="stable")
    ukeys, total = _ordered_segment_sum(keys, ranks, grads, order)
    return ukeys, total / grads.dtype.type(num_live)


def aggregate_dense(pushes: list[Any], num_live: int, size: int | None = None) -> np.ndarray:
    """Sync aggregation of dense pushes ``[(rank, grad), ...]`` in arrival order. A push may
    be a part ``(rank, grad, start)`` of a range of ``size`` elements (a move brought it from
    the old owner of ``[start, start + len(grad))``): each element then sums the pushes that
    hold it as a whole push would, bit for bit; an element no push holds gets 0."""
    if size is not None and any(len(p) == 3 for p in pushes):
        return _aggregate_parts(pushes, num_live, size)
    by_rank: dict[int, np.ndarray] = {}
    for rank, grad in pushes:
        if rank in by_rank:
            by_rank[rank] += grad
        else:
            by_rank[rank] = grad.copy()
    ranks = sorted(by_rank)
    total = by_rank[ranks[0]]
    for r in ranks[1:]:
        total += by_rank[r]
    mean: np.ndarray = total / total.dtype.type(num_live)
    return mean


def _aggregate_parts(pushes: list[Any], num_live: int, size: int) -> np.ndarray:
    """:func:`aggregate_dense` with parts: per element the first push of a rank is taken as it
    is and the next ones added (as ``grad.copy()`` then ``+=``), then the ranks in order, so
    that a part sums exactly like the whole push it was cut from."""
    by_rank: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for p in pushes:
        rank, grad, start = p[0], p[1], (p[2] if len(p) == 3 else 0)
        if rank not in by_rank:
            by_rank[rank] = (np.zeros(size, grad.dtype), np.zeros(size, bool))
        total, have = by_rank[rank]
        _take(total[start : start + len(grad)], have[start : start + len(grad)], grad)
    first = next(iter(by_rank.values()))[0]
    total, have = np.zeros(size, first.dtype), np.zeros(size, bool)
    for r in sorted(by_rank):
        _take(total, have, by_rank[r][0], by_rank[r][1])
    mean: np.ndarray = total / total.dtype.type(num_live)
    return mean


def _take(total: np.ndarray, have: np.ndarray, add: np.ndarray, where: Any = True) -> None:
    """``total = add`` where nothing was taken yet, else ``total += add`` (where ``where``)."""
    new = ~have & where
    np.copyto(total, add, where=new)
    np.add(total, add, out=total, where=have & where)
    have |= new


@dataclass
class SyncBuffer:
    """Pushes of a sync table waiting for their clock to complete, by clock."""

    kind: str
    pending: dict[int, list[Any]] = field(default_factory=dict)

    def add(self, clock: int, item: Any) -> None:
        self.pending.setdefault(clock, []).append(item)

    def take_completed(self, min_clock: int) -> list[tuple[int, list[Any]]]:
        """Remove and return, in clock order, the buffered clocks below ``min_clock``."""
        done = sorted(c for c in self.pending if c < min_clock)
        return [(c, self.pending.pop(c)) for c in done]


@dataclass
class DeferredPull(Generic[T]):
    """A pull that waits: ``item`` is whatever answers it (the caller's), the rest decides."""

    item: T
    mode: str
    bound: int
    clock: int
    deadline: float
    since: float


class DeferredPulls(Generic[T]):
    """The pulls waiting for slower workers, in the order they came.

    Example:
        waiting = DeferredPulls[str]()
        waiting.add("pull 1", "ssp", 1, clock=3, deadline=now + 5.0, now=now)
        waiting.release(min_clock=1)    # []: ssp:1 at clock 3 waits for clock 2
        waiting.release(min_clock=2)    # ["pull 1"]
    """

    def __init__(self) -> None:
        self.waiting: list[DeferredPull[T]] = []

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, item: T, mode: str, bound: int, clock: int, deadline: float, now: float) -> None:
        self.waiting.append(DeferredPull(item, mode, bound, clock, deadline, now))

    def release(self, min_clock: int) -> list[T]:
        """Remove and return (in arrival order) the pulls :func:`pull_ready` now allows."""
        if not self.waiting:
            return []
        ready = [d for d in self.waiting if pull_ready(d.mode, d.bound, d.clock, min_clock)]
        if ready:
            self.waiting = [
                d for d in self.waiting if not pull_ready(d.mode, d.bound, d.clock, min_clock)
            ]
        return [d.item for d in ready]

    def expire(self, now: float) -> list[DeferredPull[T]]:
        """Remove and return the pulls whose deadline has passed."""
        late = [d for d in self.waiting if now >= d.deadline]
        if late:
            self.waiting = [d for d in self.waiting if now < d.deadline]
        return late

    def next_deadline(self) -> float | None:
        return min((d.deadline for d in self.waiting), default=None)
