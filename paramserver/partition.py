"""Which server owns a key of a sparse table, or a range of a dense table.

Sparse keys are spread by a consistent-hash ring with virtual nodes: all keys are hashed at once,
``searchsorted`` finds their ring points, and a stable radix sort on the owner groups them per
server. A dense table smaller than :data:`DENSE_SPLIT_ELEMENTS` lives whole on one server chosen by
a hash of its name; a larger one is cut into contiguous ranges, one per server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from paramserver.errors import ConfigError
from paramserver.loading import use_kernels

__all__ = [
    "DENSE_SPLIT_ELEMENTS",
    "SMALL_KEYS",
    "HashRing",
    "check_replication",
    "dense_copies",
    "dense_pieces",
    "dense_ranges",
    "hash_keys",
    "held_keys",
    "holds",
    "in_numpy",
    "owners_held",
    "replicas_of",
    "split_by_owner",
]

DENSE_SPLIT_ELEMENTS = 1 << 18
DEFAULT_VNODES = 64

# Routing uses its own salt so that the keys one server receives are not correlated with the
# hash the server's own index uses.
_ROUTE_SALT = np.uint64(0x5F3759DF2545F491)


# Key lists up to this long are hashed, deduplicated, routed and placed by NumPy in a worker
# (as fast there): its pulls of short lists (a first pull, a check, a lookup) load no numba,
# whose import and kernel loads cost 0.3-0.6 s of CPU, most of a LocalCluster's start on two
# cores. A push's sum of repeated keys is always compiled (NumPy has no scatter-add that adds in
# the list's order): a push waits for the loads that a first long pull did not.
SMALL_KEYS = 1024


def in_numpy(n: int) -> bool:
    """Whether a list of ``n`` keys is hashed, deduplicated, routed and placed by NumPy: a short
    one always; a long one while the worker's kernels are still loading
    (:func:`paramserver.loading.use_kernels`, which starts the loads). Both paths give the same
    values.

    Example:
        in_numpy(8)  # True
    """
    return n <= SMALL_KEYS or not use_kernels()


# splitmix64's constants (paramserver.mix, which imports numba; a unit test holds them equal)
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)
_M1 = np.uint64(0xBF58_476D_1CE4_E5B9)
_M2 = np.uint64(0x94D0_49BB_1331_11EB)


def hash_keys(keys: np.ndarray, salt: np.uint64 = _ROUTE_SALT) -> np.ndarray:
    """splitmix64 of ``keys ^ salt`` (:func:`paramserver.mix.splitmix64`); uint64 in and out.

    Example:
        hash_keys(np.arange(3, dtype=np.uint64))
    """
    if in_numpy(np.size(keys)):
        z = (np.asarray(keys, dtype=np.uint64) ^ np.uint64(salt)) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)
    # imported here: loading numba (0.3-0.6 s of CPU) is for those that route long key lists
    # (workers), not for the coordinator, which only cuts dense ranges
    from paramserver.mix import splitmix64

    return splitmix64(keys, salt)


@dataclass(frozen=True)
class HashRing:
    """A consistent-hash ring over server ranks.

    Example:
        ring = HashRing.build([0, 1])
        owners = ring.route(np.array([7, 42], dtype=np.uint64))  # server rank per key
    """

    points: np.ndarray  # sorted uint64 ring positions
    owners: np.ndarray  # server rank at each position (int32)

    @classmethod
    def build(cls, servers: list[int], vnodes: int = DEFAULT_VNODES) -> HashRing:
        if not servers:
            raise ValueError("a hash ring needs at least one server")
        ranks = np.repeat(np.asarray(servers, dtype=np.uint64), vnodes)
        replica = np.tile(np.arange(vnodes, dtype=np.uint64), len(servers))
        pts = hash_keys(ranks * np.uint64(1 << 20) + replica, salt=np.uint64(0x243F6A8885A308D3))
        order = np.argsort(pts, kind="stable")
        return cls(points=pts[order], owners=ranks[order].astype(np.int32))

    @property
    def servers(self) -> list[int]:
        return sorted({int(s) for s in self.owners})

    def route(self, keys: np.ndarray) -> np.ndarray:
        """Server rank owning each key (int32 array, same length as ``keys``)."""
        if len(self.points) == 0:
            raise ValueError("empty ring")
        idx = np.searchsorted(self.points, hash_keys(keys), side="right")
        idx[idx == len(self.points)] = 0
        return self.owners[idx]


def split_by_owner(owners: np.ndarray, n_owners: int) -> tuple[np.ndarray, np.ndarray]:
    """Group positions by owner: returns (order, bounds) so that
    ``order[bounds[s]:bounds[s+1]]`` are the positions owned by ``s``, in their original order.

    Example:
        order, bounds = split_by_owner(np.array([1, 0, 1], dtype=np.int32), 2)
        # order = [1, 0, 2], bounds = [0, 1, 3]
    """
    if n_owners <= 1:
        return np.arange(len(owners)), np.array([0, len(owners)])
    small = owners.astype(np.uint16 if n_owners < 1 << 16 else np.int64)
    order = np.argsort(small, kind="stable")  # radix sort for 16-bit integers
    counts = np.bincount(small, minlength=n_owners)
    bounds = np.zeros(n_owners + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    return order, bounds


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def dense_ranges(
    name: str, size: int, servers: list[int], split_at: int = DENSE_SPLIT_ELEMENTS
) -> list[tuple[int, int, int]]:
    """Cut a dense table of ``size`` elements into ``(server, start, stop)`` ranges.

    Example:
        dense_ranges("mlp", 10, [0, 1])  # small: [(s, 0, 10)] on the server the name hashes to
    """
    if not servers:
        raise ValueError("no servers to place the table on")
    servers = sorted(servers)
    if size < split_at or len(servers) == 1:
        return [(servers[_name_hash(name) % len(servers)], 0, size)]
    cuts = [size * i // len(servers) for i in range(len(servers) + 1)]
    return [(s, cuts[i], cuts[i + 1]) for i, s in enumerate(servers)]


def dense_pieces(
    old: list[tuple[int, int, int]] | tuple[tuple[int, int, int], ...],
    new: list[tuple[int, int, int]] | tuple[tuple[int, int, int], ...],
) -> list[tuple[int, int, int, int]]:
    """The parts of a dense table that change server when its ranges go from ``old`` to
    ``new`` (both tiling the same table): ``(source, dest, start, stop)``, in element order,
    one per overlap of an old and a new range with different servers. A loop over ranges
    (a handful per table), not over elements.

    Example:
        dense_pieces([(0, 0, 10), (1, 10, 20)], [(0, 0, 7), (1, 7, 14), (2, 14, 20)])
        # [(0, 1, 7, 10), (1, 2, 14, 20)]
    """
    pieces: list[tuple[int, int, int, int]] = []
    for src, a, b in sorted(old, key=lambda r: r[1]):
        for dst, c, d in sorted(new, key=lambda r: r[1]):
            lo, hi = max(a, c), min(b, d)
            if lo < hi and src != dst:
                pieces.append((src, dst, lo, hi))
    return pieces


def dense_copies(
    old: Sequence[tuple[int, int, int]],
    new: Sequence[tuple[int, int, int]],
    rings: tuple[Sequence[int], Sequence[int]],
    replication: int,
) -> list[tuple[int, int, int, int]]:
    """:func:`dense_pieces` with ``replication`` copies of every range, the rings ``(old ring,
    new ring)`` placing them (:func:`replicas_of`): ``(source, dest, start, stop)`` for every
    holder ``dest`` of a new range that did not hold those elements before, ``source`` their
    old primary (one copy sends). Without replication: :func:`dense_pieces`.

    Example:
        dense_copies([(2, 0, 8)], [(2, 0, 8)], ([0, 1, 2], [0, 1, 2, 3]), 2)   # [(2, 3, 0, 8)]
    """
    pieces: list[tuple[int, int, int, int]] = []
    for src, a, b in sorted(old, key=lambda r: r[1]):
        had = replicas_of(src, rings[0], replication)
        for dst, c, d in sorted(new, key=lambda r: r[1]):
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                pieces += [(src, r, lo, hi) for r in replicas_of(dst, rings[1], replication)
                           if r not in had]  # fmt: skip
    return pieces


def _members(servers: int | Sequence[int]) -> list[int]:
    """The ring's server ranks, sorted: ``range(servers)`` for a count (a fixed server set)."""
    if isinstance(servers, int):
        return list(range(servers))
    return sorted({int(s) for s in servers})


def replicas_of(rank: int, servers: int | Sequence[int], replication: int) -> list[int]:
    """The servers that hold what server ``rank`` owns (its ring keys, its dense ranges) with
    ``replication`` copies: ``rank`` itself (the primary) and the next ``replication - 1``
    servers of the sorted ring list ``servers`` after it, wrapping around (a count ``n`` means
    ranks ``0..n-1``: then the next ranks). Placed along the ring's members, not by rank
    arithmetic, so that a join or a drain changes the copies of the few owners next to the
    server that came or went (coordinator/scaling.py). A ``rank`` off the list (a server
    joining or leaving) is placed where it would sort.

    Example:
        replicas_of(2, 3, 2)           # [2, 0]
        replicas_of(3, [0, 1, 3], 2)   # [3, 0]
    """
    members = _members(servers)
    k = min(max(replication, 1), max(len(members), 1))
    after = [s for s in members if s > rank] + [s for s in members if s < rank]
    return [rank, *after[: k - 1]]


def holds(server: int, owner: int, servers: int | Sequence[int], replication: int) -> bool:
    """Whether ``server`` holds a copy of what ``owner`` owns (see :func:`replicas_of`).

    Example:
        holds(0, 2, 3, 2)   # True: server 0 is the second replica of server 2
    """
    if replication <= 1:
        return server == owner
    return server in replicas_of(owner, servers, replication)


def owners_held(server: int, servers: int | Sequence[int], replication: int) -> list[int]:
    """The owners on the ring ``servers`` whose ranges ``server`` holds a copy of (itself
    first if it is on the ring).

    Example:
        owners_held(0, [0, 1, 2], 2)   # [0, 2]
    """
    members = _members(servers)
    held = [o for o in members if o != server and holds(server, o, members, replication)]
    return ([server] if server in members else []) + held


def held_keys(keys: np.ndarray, ring: HashRing, server: int, replication: int) -> np.ndarray:
    """Which of ``keys`` ``server`` holds a copy of on ``ring`` (bool per key): their owner is
    one of :func:`owners_held`. Without replication: the keys ``ring`` gives ``server``.

    Example:
        held_keys(np.arange(4, dtype=np.uint64), HashRing.build([0, 1]), 0, 2)   # all True
    """
    if len(keys) == 0:
        return np.zeros(0, bool)
    owners = ring.route(keys)
    if replication <= 1:
        return np.asarray(owners == server)
    return np.isin(owners, np.asarray(owners_held(server, ring.servers, replication), np.int32))


def check_replication(replication: object, num_servers: int) -> int:
    """``replication`` if it is a number of copies this cluster can hold, else ConfigError.

    Example:
        check_replication(2, 3)   # 2
    """
    if not isinstance(replication, int) or isinstance(replication, bool) or replication < 1:
        raise ConfigError(f"replication must be an integer >= 1, got {replication!r}")
    if replication > num_servers:
        raise ConfigError(
            f"replication={replication} needs at least {replication} servers, the cluster has "
            f"{num_servers}: every key range lives on {replication} distinct servers (start "
            f"more servers, or lower the replication)"
        )
    return replication
