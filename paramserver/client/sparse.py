"""Handles on the tables of a cluster: the sparse table (dedup, routing, key caching, pull and
push of rows) and what every table handle shares. The dense table is in :mod:`paramserver.client.dense`.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from paramserver.arrays import all_finite, as_keys
from paramserver.errors import ConfigError, RemoteError
from paramserver.partition import split_by_owner
from paramserver.spec import TableSpec
from paramserver.wire.codec import decode_rows
from paramserver.wire.transport import (
    Future,
    Message,
    gather,
)

if TYPE_CHECKING:
    from paramserver.client.session import Client

__all__ = ["SparseTable", "unique_inverse"]

log = logging.getLogger(__name__)


def _server(rank: int) -> str:
    return f"server[{rank}]"


class _Handle:
    def __init__(self, client: Client, spec: TableSpec) -> None:
        self.client = client
        self.spec = spec
        self.name = spec.name
        self.dtype = spec.np_dtype
        self._staleness: Counter[int] = Counter()

    def staleness(self) -> dict[int, int]:
        """Histogram of the staleness this worker's pulls were served with: {clocks: count}.

        Example:
            emb.staleness()    # {0: 950, 1: 40, 2: 10}
        """
        return dict(sorted(self._staleness.items()))

    def set_lr(self, lr: float, *, timeout: float | None = None) -> None:
        """Change the learning rate of this table's optimizer on every server.

        Example:
            emb.set_lr(0.01)
        """
        opt = self.spec.optimizer.with_lr(lr)
        futs = [
            self.client._ep.request(
                _server(s),
                {"kind": "set_lr", "table": self.name, "lr": float(lr)},
                what=f"set_lr of table {self.name!r} on {_server(s)}",
            )
            for s in range(self.client.num_servers)
        ]
        for f in futs:
            f.result(timeout)
        self.spec = replace(self.spec, optimizer=opt)

    def _check_grads(self, grads: Any, shape: tuple[int, ...]) -> np.ndarray:
        g = np.asarray(grads)
        if g.dtype != self.dtype:
            raise ConfigError(
                f"table {self.name!r}: gradient dtype must be {self.dtype}, got {g.dtype}"
            )
        if g.shape != shape:
            raise ConfigError(f"table {self.name!r}: gradient shape must be {shape}, got {g.shape}")
        # with nonfinite="skip" the servers drop the rows holding NaN or Inf themselves
        if self.spec.nonfinite == "reject" and not all_finite(g):
            raise ConfigError(
                f"table {self.name!r}: gradient contains NaN or Inf; push refused, "
                "the table is unchanged (create the table with nonfinite='skip' to drop such "
                "rows instead)"
            )
        return np.ascontiguousarray(g)

    def _push_header(self) -> dict[str, Any]:
        c = self.client
        return {"kind": "push", "table": self.name, "rank": c.rank, "clock": c._clock,
                "seq": c._next_seq()}  # fmt: skip

    def _pull_header(self, create: bool, timeout: float) -> dict[str, Any]:
        c = self.client
        return {
            "kind": "pull",
            "table": self.name,
            "rank": c.rank,
            "clock": c._clock,
            "create": create,
            "timeout": timeout,
        }

    def _record(self, staleness: list[int]) -> None:
        self._staleness[max(staleness, default=0)] += 1


@dataclass
class _KeyPlan:
    """How one key list travels: its distinct keys split by server. With ``sig`` set the
    servers have resolved the keys to rows and later requests carry only the signature."""

    keys: np.ndarray  # the flat key list (a private copy when cached)
    base: np.ndarray  # the keys sent, in the order rows come back: the list itself if distinct
    inverse: np.ndarray | None  # base position of each key (None: base is the list)
    parts: list[tuple[int, np.ndarray | None, np.ndarray]]  # (server, base positions|all, keys)
    sig: int | None = None
    known: set[int] = dc_field(default_factory=set)  # servers that have resolved ``sig``


KEY_CACHE_LISTS = 8  # key lists a worker caches per table (servers keep more, see server.loop)
RECENT_LISTS = 2  # latest key lists whose dedup a worker reuses without caching them


FACTORIZE_MIN = 2048  # shorter lists: np.unique is as fast, and nothing more is imported


@functools.cache
def _factorize() -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    try:
        from pandas import factorize
    except ImportError:
        return None
    return cast(Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], factorize)


def unique_inverse(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys of ``flat`` and the position of each key among them
    (``uniq[inverse] == flat``). Long lists go through a hash table, pandas' ``factorize``
    where pandas is installed (0.11 ms for 20k keys against 0.9 ms for ``np.unique``'s sort);
    the distinct keys then come in order of first appearance rather than sorted.

    Example:
        >>> uniq, inv = unique_inverse(np.array([5, 3, 5], np.uint64))
        >>> uniq[inv].tolist()
        [5, 3, 5]
    """
    factorize = _factorize() if len(flat) >= FACTORIZE_MIN else None
    if factorize is None:
        uniq, inverse = np.unique(flat, return_inverse=True)
        return uniq, inverse
    codes, uniques = factorize(flat)
    return np.asarray(uniques, dtype=flat.dtype), np.asarray(codes, dtype=np.intp)


def _fingerprint(flat: np.ndarray) -> tuple[int, ...]:
    # O(1): length and a few sampled keys. Only a hint: a hit is confirmed by comparing the
    # whole list, so a collision costs a comparison, never a wrong answer.
    n = len(flat)
    if n == 0:
        return (0,)
    picks = flat[[0, n // 7, n // 3, n // 2, (2 * n) // 3, n - 1]]
    return (n, *(int(v) for v in picks))


class SparseTable(_Handle):
    """Handle on a sparse table: rows of width ``dim`` keyed by uint64 ids.

    A key list sent again (the same features every step, ps-lite's benchmark shape) is cached
    after its third sighting: the worker reuses its dedup and routing, and the servers keep
    the resolved rows, so later requests carry a signature instead of the keys (OSDI 2014).

    Example:
        rows = emb.pull(np.array([7, 42, 7], dtype=np.uint64))   # (3, dim)
        emb.push(keys, grads).result()
    """

    def __init__(self, client: Client, spec: TableSpec) -> None:
        super().__init__(client, spec)
        self._plans: OrderedDict[tuple[int, ...], _KeyPlan] = OrderedDict()
        self._seen: OrderedDict[tuple[int, ...], int] = OrderedDict()
        # the key lists of the latest requests: a push after the pull of the same batch, also
        # when the pull of the next batch went out in between (prefetch), reuses their dedup
        self._recent: list[tuple[tuple[int, ...], _KeyPlan]] = []

    @property
    def dim(self) -> int:
        return self.spec.dim

    def _plan(self, flat: np.ndarray, cacheable: bool) -> tuple[_KeyPlan, int | None]:
        """The plan of a key list, and the signature this request may travel by: none unless
        ``cacheable``. Rows resolved under a signature are created rows, so an evaluation pull
        (create=False) sends its keys; a sync table buffers each push's keys until its clock
        completes, so pushes to it send theirs. A plan shared with a cacheable request may hold
        a signature all the same."""
        plan = self._find_plan(flat, cacheable)
        return plan, plan.sig if cacheable else None

    def _find_plan(self, flat: np.ndarray, cacheable: bool) -> _KeyPlan:
        fp = _fingerprint(flat)
        if cacheable:
            plan = self._plans.get(fp)
            if plan is not None and np.array_equal(plan.keys, flat):
                self._plans.move_to_end(fp)
                return plan
        last = next(
            (r for r in self._recent if r[0] == fp and np.array_equal(r[1].keys, flat)), None
        )
        if last is not None:
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
        owners = self.client.ring.route(base)
        order, bounds = split_by_owner(owners, self.client.num_servers)
        parts: list[tuple[int, np.ndarray | None, np.ndarray]] = []
        for s in range(self.client.num_servers):
            idx = order[bounds[s] : bounds[s + 1]]
            if len(idx) == 0:
                continue
            if len(idx) == len(base):  # one server owns every key: no split, no copy
                parts.append((s, None, np.ascontiguousarray(base)))
            else:
                parts.append((s, idx, np.ascontiguousarray(base[idx])))
        # a private copy of the list: the caller may reuse its array for the next batch
        keys = flat.copy()
        plan = _KeyPlan(keys, keys if distinct else base, None if distinct else inverse, parts)
        if distinct and len(parts) == 1 and parts[0][1] is None:
            plan.parts = [(parts[0][0], None, keys)]
        self._recent = [(fp, plan), *self._recent[: RECENT_LISTS - 1]]
        self._seen[fp] = self._seen.get(fp, 0) + 1
        self._seen.move_to_end(fp)
        while len(self._seen) > 4 * KEY_CACHE_LISTS:
            self._seen.popitem(last=False)
        if cacheable and self._seen[fp] >= 3:
            self._promote(fp, plan)
        return plan

    def _promote(self, fp: tuple[int, ...], plan: _KeyPlan) -> None:
        plan.sig = secrets.randbits(63)
        self._plans[fp] = plan
        while len(self._plans) > KEY_CACHE_LISTS:
            self._plans.popitem(last=False)

    def _forget(self, plan: _KeyPlan) -> None:
        for fp, p in list(self._plans.items()):
            if p is plan:
                del self._plans[fp]
        self._recent = [r for r in self._recent if r[1] is not plan]

    def pull_async(
        self, keys: Any, *, create: bool = True, timeout: float | None = None
    ) -> Future[np.ndarray]:
        """Start a pull and return its future (overlap it with compute).

        Example:
            nxt = emb.pull_async(next_keys); ...; rows = nxt.result()
        """
        c = self.client
        c._check()
        limit = c.timeouts.request if timeout is None else timeout
        k = as_keys(keys, self.name)
        flat = k.reshape(-1)
        plan, sig = self._plan(flat, cacheable=create)
        header = self._pull_header(create, limit)
        futs: list[Future[None]] = []
        staleness: list[int] = []
        codec = self.spec.codec
        # every server's rows go straight into the result, in the order of plan.base
        rows = np.empty((len(plan.base), self.dim), dtype=self.dtype)

        def into(idx: np.ndarray | None, n: int) -> Callable[[Message], None]:
            def parse(msg: Message) -> None:
                staleness.append(int(msg[0].get("staleness") or 0))
                try:
                    part = decode_rows(msg[1], codec, self.dim, self.dtype)
                except ValueError as exc:
                    raise ConfigError(f"table {self.name!r}: {exc}") from None
                if part.shape != (n, self.dim):
                    raise ConfigError(f"table {self.name!r}: server answered {part.shape} rows")
                if idx is None:
                    rows[...] = part
                else:
                    rows[idx] = part

            return parse

        sent: list[int] = []
        for s, idx, part_keys in plan.parts:
            h = header
            arrays = [part_keys]
            if sig is not None:
                h = {**header, "sig": sig}
                if s in plan.known:
                    arrays = []
                else:
                    sent.append(s)
            futs.append(
                c._server_request(
                    s,
                    h,
                    arrays,
                    what=f"pull of {len(part_keys)} keys of table {self.name!r} from "
                    f"{_server(s)} ({c._ep.address_of(_server(s))})",
                    parse=into(idx, len(part_keys)),
                    reply_bytes=rows.nbytes if idx is None else len(idx) * rows[:1].nbytes,
                )
            )
        # fresh memory is mapped on first write: have that happen while the servers work
        rows.fill(0)

        def combine(_: list[None]) -> np.ndarray:
            plan.known.update(sent)
            self._record(staleness)
            out = rows if plan.inverse is None else rows[plan.inverse]
            return out.reshape((*k.shape, self.dim))

        fut = gather(futs, f"pull of table {self.name!r}", combine)
        if sig is None:
            return fut
        return self._retry_unknown(
            fut, plan, lambda: self.pull_async(k, create=create, timeout=timeout)
        )

    def _retry_unknown(self, fut: Future[Any], plan: _KeyPlan, again: Any) -> Future[Any]:
        """A server that lost a key list (restarted, or evicted it) answers ``unknown_sig``:
        forget the plan and send the request again with its keys."""
        outer: Future[Any] = Future(self.client._ep, fut.what)

        def done(f: Future[Any]) -> None:
            err = f._error
            if isinstance(err, RemoteError) and err.code == "unknown_sig":
                self._forget(plan)
                plan.sig = None
                retry = again()
                retry.add_done_callback(
                    lambda r: (
                        outer.set_exception(r._error)
                        if r._error is not None
                        else outer.set_result(r._value)
                    )
                )
            elif err is not None:
                outer.set_exception(err)
            else:
                outer.set_result(f._value)

        fut.add_done_callback(done)
        return outer

    def pull(self, keys: Any, *, create: bool = True, timeout: float | None = None) -> np.ndarray:
        """Return the rows for ``keys``, creating missing rows on the servers (``create=False``:
        unseen keys come back with their initial value and are not stored).

        Example:
            rows = emb.pull(np.array([7, 7, 42], dtype=np.uint64))  # shape (3, emb.dim)
        """
        limit = self.client.timeouts.request if timeout is None else timeout
        return self.pull_async(keys, create=create, timeout=limit).result(limit + 1.0)

    def push(self, keys: Any, grads: Any) -> Future[None]:
        """Send gradients for ``keys`` (repeated keys are summed first); returns at once.

        ``.result()`` on the returned future waits for every server's acknowledgement. Do not
        modify ``grads`` until then.

        Example:
            emb.push(keys, grads).result()
        """
        c = self.client
        c._check()
        k = as_keys(keys, self.name)
        flat = k.reshape(-1)
        g = self._check_grads(grads, (*k.shape, self.dim)).reshape(len(flat), self.dim)
        mode, _ = self.spec.mode
        plan, sig = self._plan(flat, cacheable=mode != "sync")
        if plan.inverse is None:
            summed = g  # distinct keys: the gradient goes as it is, in the list's order
        else:
            summed = np.zeros((len(plan.base), self.dim), dtype=self.dtype)
            np.add.at(summed, plan.inverse, g)
        header = self._push_header()
        return self._send_push(plan, sig, header, summed)

    def _send_push(
        self, plan: _KeyPlan, sig: int | None, header: dict[str, Any], summed: np.ndarray
    ) -> Future[None]:
        c = self.client
        futs: list[Future[Any]] = []
        sent: list[int] = []
        for s, idx, part_keys in plan.parts:
            part = summed if idx is None else summed[idx]
            h = header
            arrays = [part_keys, part]
            if sig is not None:
                h = {**header, "sig": sig}
                if s in plan.known:
                    arrays = [part]
                else:
                    sent.append(s)
            futs.append(
                c._server_request(
                    s,
                    h,
                    arrays,
                    what=f"push of {len(part_keys)} rows of table {self.name!r} to {_server(s)}",
                    reply_bytes=0,
                )
            )
        c._ep.poll(0)

        def acked(_: list[Any]) -> None:
            plan.known.update(sent)

        fut = gather(futs, f"push to table {self.name!r}", acked)
        if sig is None:
            return fut
        # a retry keeps the sequence number: a server that applied the first try skips it
        return self._retry_unknown(fut, plan, lambda: self._send_push(plan, None, header, summed))
