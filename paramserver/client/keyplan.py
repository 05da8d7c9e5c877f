"""Key plans: how one key list of a sparse request travels. Its distinct keys (dedup by
:func:`unique_inverse`), which server owns each (routing on the hash ring), and, for a list
sent again and again, the signature under which the servers keep it resolved.

Pure: no sockets, no tables. :class:`~paramserver.client.sparse.SparseTable` keeps one
:class:`KeyPlanCache` and asks it for the plan of every key list it sends.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np

from paramserver.partition import HashRing, in_numpy, split_by_owner

__all__ = [
    "AS_IS_KEYS",
    "KEY_CACHE_LISTS",
    "RECENT_LISTS",
    "KeyPlan",
    "KeyPlanCache",
    "route_keys",
    "unique_inverse",
]

KEY_CACHE_LISTS = 8  # key lists a worker caches per table (servers keep more: server/keycache)
RECENT_LISTS = 2  # latest key lists whose dedup a worker reuses without caching them
AS_IS_KEYS = 1 << 15  # a list this long that looks distinct is sent before its dedup
SAMPLE_KEYS = 1024  # keys of a list checked for repeats before sending it as it is

# (server, positions in ``base`` | None for all of it, the keys it gets)
Parts = list[tuple[int, np.ndarray | None, np.ndarray]]


@dataclass
class KeyPlan:
    """How one key list travels: its distinct keys split by server. With ``sig`` set the
    servers have resolved the keys to rows and later requests carry only the signature."""

    keys: np.ndarray  # the flat key list (a private copy when cached)
    base: np.ndarray  # the keys sent, in the order rows come back: the list itself if distinct
    inverse: np.ndarray | None  # base position of each key (None: base is the list)
    parts: Parts
    sig: int | None = None
    known: set[int] = dc_field(default_factory=set)  # servers that have resolved ``sig``
    # where each part's rows go in the list (group_by_part), made on the first pull that needs it
    spread: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # False: a list sent as it is (KeyPlanCache.sent_as_is) whose dedup is not made yet: base
    # and inverse are a guess that only a pull may use (the server answers a repeat as a key)
    checked: bool = True

    def placement(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(positions, rows, bounds)``: for part ``p`` and ``t`` in
        ``bounds[p]:bounds[p+1]``, key ``positions[t]`` of the list is row ``rows[t]`` of that
        part's reply (see :func:`paramserver.client.kernels.group_by_part`)."""
        if self.spread is None:
            n = len(self.base)
            part_of = np.empty(n, np.intp)
            row_in_part = np.empty(n, np.intp)
            for p, (_, idx, part_keys) in enumerate(self.parts):
                where = slice(None) if idx is None else idx
                part_of[where] = p
                row_in_part[where] = np.arange(len(part_keys))
            inverse = np.arange(n) if self.inverse is None else self.inverse
            nparts = len(self.parts)
            if in_numpy(len(inverse)):
                owner = part_of[inverse]
                positions = np.argsort(owner, kind="stable").astype(np.intp)
                bounds = np.zeros(nparts + 1, np.intp)
                np.cumsum(np.bincount(owner, minlength=nparts), out=bounds[1:])
                self.spread = positions, row_in_part[inverse[positions]], bounds
            else:
                from paramserver.client.kernels import group_by_part

                self.spread = group_by_part(inverse, part_of, row_in_part, nparts)
        return self.spread


def unique_inverse(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys of ``flat``, in order of first appearance, and the position of each key
    among them (``uniq[inverse] == flat``): one pass through a hash table
    (:func:`paramserver.client.kernels.dedup`; 0.47 ms for a Zipf batch of 65,536 keys against
    0.77 ms for pandas' ``factorize`` and 7.1 ms for ``np.unique``'s sort).

    Example:
        >>> uniq, inv = unique_inverse(np.array([5, 3, 5], np.uint64))
        >>> uniq.tolist(), uniq[inv].tolist()
        ([5, 3], [5, 3, 5])
    """
    if in_numpy(len(flat)):
        uniq, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # in order of first appearance
        rank = np.empty(len(order), np.intp)
        rank[order] = np.arange(len(order))
        return uniq[order], rank[inverse.reshape(-1)]
    from paramserver.client.kernels import dedup  # numba: loaded on first use

    return dedup(flat)


def route_keys(base: np.ndarray, ring: HashRing, num_servers: int) -> Parts:
    """Split the distinct keys ``base`` by the server that owns them: ``(server, positions in
    base or None when that server owns every key, its keys)`` for each server with keys.

    Example:
        parts = route_keys(np.array([1, 2, 3], np.uint64), HashRing.build([0, 1]), 2)
    """
    if num_servers == 1:  # the one server owns every key: nothing to hash
        return [(0, None, np.ascontiguousarray(base))]
    owners = ring.route(base)
    order, bounds = split_by_owner(owners, num_servers)
    parts: Parts = []
    for s in range(num_servers):
        idx = order[bounds[s] : bounds[s + 1]]
        if len(idx) == 0:
            continue
        if len(idx) == len(base):  # one server owns every key: no split, no copy
            parts.append((s, None, np.ascontiguousarray(base)))
        else:
            parts.append((s, idx, np.ascontiguousarray(base[idx])))
    return parts


def fingerprint(flat: np.ndarray) -> tuple[int, ...]:
    """O(1): length and a few sampled keys. Only a hint: a hit is confirmed by comparing the
    whole list, so a collision costs a comparison, never a wrong answer."""
    n = len(flat)
    if n == 0:
        return (0,)
    picks = flat[[0, n // 7, n // 3, n // 2, (2 * n) // 3, n - 1]]
    return (n, *(int(v) for v in picks))


class KeyPlanCache:
    """The plans of one table's key lists: the latest few (a push after the pull of the same
    batch reuses its dedup) and the cached ones (seen three times: the servers keep them
    resolved under a signature).

    Example:
        cache = KeyPlanCache(HashRing.build([0]), 1)
        plan = cache.find(np.array([4, 4, 9], np.uint64), cacheable=True)
    """

    def __init__(self, ring: HashRing, num_servers: int) -> None:
        self.ring = ring
        self.num_servers = num_servers
        self._plans: OrderedDict[tuple[int, ...], KeyPlan] = OrderedDict()
        self._seen: OrderedDict[tuple[int, ...], int] = OrderedDict()
        # the key lists of the latest requests: a push after the pull of the same batch, also
        # when the pull of the next batch went out in between (prefetch), reuses their dedup
        self._recent: list[tuple[tuple[int, ...], KeyPlan]] = []

    def values(self) -> list[KeyPlan]:
        """The cached plans (those with a signature), oldest first."""
        return list(self._plans.values())

    def plan(self, flat: np.ndarray, cacheable: bool) -> tuple[KeyPlan, int | None]:
        """The plan of a key list, and the signature this request may travel by: none unless
        ``cacheable``. Rows resolved under a signature are created rows, so an evaluation pull
        (create=False) sends its keys; a sync table buffers each push's keys until its clock
        completes, so pushes to it send theirs. A plan shared with a cacheable request may hold
        a signature all the same."""
        plan = self.find(flat, cacheable)
        return plan, plan.sig if cacheable else None

    def known(self, flat: np.ndarray, cacheable: bool) -> KeyPlan | None:
        """The plan :meth:`find` would reuse for ``flat`` (cached or recent), else None; no
        counting, nothing made."""
        fp = fingerprint(flat)
        if cacheable:
            plan = self._plans.get(fp)
            if plan is not None and np.array_equal(plan.keys, flat):
                return plan
        return next(
            (
                r[1]
                for r in self._recent
                if r[0] == fp and r[1].checked and np.array_equal(r[1].keys, flat)
            ),
            None,
        )

    def sent_as_is(self, flat: np.ndarray) -> KeyPlan | None:
        """A plan that sends ``flat`` as it is to the one server, for a long list that looks
        distinct (no key repeats among :data:`SAMPLE_KEYS` spread over it): the server then
        answers every key in list order, also a repeat the sample missed, and the list's own
        plan (:meth:`find`) is made when a request needs it (:meth:`sent`). None with more
        than one server.

        Example:
            plan = cache.sent_as_is(np.arange(100_000, dtype=np.uint64))
        """
        n = len(flat)
        if self.num_servers != 1 or n < AS_IS_KEYS:
            return None
        # sorted, a repeat sits next to its twin: 6 us for the sample, where np.unique (a hash
        # table in NumPy 2) took 70-100 us of the worker's time before the request went out
        sample = np.sort(flat[:: n // SAMPLE_KEYS])
        if bool((sample[1:] == sample[:-1]).any()):
            return None
        keys = flat.copy()  # the caller may reuse its array for the next batch
        return KeyPlan(keys, keys, None, [(0, None, keys)], checked=False)

    def sent(self, plan: KeyPlan, cacheable: bool) -> None:
        """Note a list :meth:`sent_as_is` sent. Its dedup waits for a request that needs it
        (the push of the same batch: :meth:`find`), so a pull alone never pays for it, unless
        the list was seen before: one sent again and again is planned now (while the server
        works), for its signature."""
        fp = fingerprint(plan.keys)
        if fp in self._seen:
            self.find(plan.keys, cacheable)
            return
        self._recent = [(fp, plan), *self._recent[: RECENT_LISTS - 1]]
        self._count(fp)

    def find(self, flat: np.ndarray, cacheable: bool) -> KeyPlan:
        """The plan of ``flat``: reused when the list was sent lately, made otherwise."""
        fp = fingerprint(flat)
        if cacheable:
            plan = self._plans.get(fp)
            if plan is not None and np.array_equal(plan.keys, flat):
                self._plans.move_to_end(fp)
                return plan
        last = next(
            (r for r in self._recent if r[0] == fp and np.array_equal(r[1].keys, flat)), None
        )
        if last is not None and last[1].checked:
            # the same list again at once (a push after the pull of one batch): reuse its
            # dedup and routing; a list seen a third time is cached on the servers too
            plan = last[1]
            self._seen[fp] = self._seen.get(fp, 0) + 1
            if cacheable and self._seen[fp] >= 3:
                self._promote(fp, plan)
            return plan
        uniq, inverse = unique_inverse(flat)
        distinct = len(uniq) == len(flat)
        base = flat if distinct else uniq
        parts = route_keys(base, self.ring, self.num_servers)
        # a private copy of the list: the caller may reuse its array for the next batch (a
        # list sent as it is has one already)
        keys = flat.copy() if last is None else last[1].keys
        plan = KeyPlan(keys, keys if distinct else base, None if distinct else inverse, parts)
        if distinct and len(parts) == 1 and parts[0][1] is None:
            plan.parts = [(parts[0][0], None, keys)]
        self._recent = [(fp, plan), *[r for r in self._recent if r is not last][: RECENT_LISTS - 1]]
        self._count(fp)
        if cacheable and self._seen[fp] >= 3:
            self._promote(fp, plan)
        return plan

    def _count(self, fp: tuple[int, ...]) -> None:
        """One more sighting of the list ``fp`` (a list seen three times gets a signature)."""
        self._seen[fp] = self._seen.get(fp, 0) + 1
        self._seen.move_to_end(fp)
        while len(self._seen) > 4 * KEY_CACHE_LISTS:
            self._seen.popitem(last=False)

    def _promote(self, fp: tuple[int, ...], plan: KeyPlan) -> None:
        plan.sig = secrets.randbits(63)
        self._plans[fp] = plan
        while len(self._plans) > KEY_CACHE_LISTS:
            self._plans.popitem(last=False)

    def forget(self, plan: KeyPlan) -> None:
        """Drop ``plan`` (a server lost its signature): the next request makes it afresh."""
        for fp, p in list(self._plans.items()):
            if p is plan:
                del self._plans[fp]
        self._recent = [r for r in self._recent if r[1] is not plan]
