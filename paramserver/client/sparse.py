"""The handle on a sparse table: rows keyed by uint64 ids, pulled and pushed through key plans
(:mod:`paramserver.client.keyplan`: dedup, routing, signatures) by way of the session."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from paramserver.arrays import all_finite, as_keys
from paramserver.client.cache import CacheSpec, RowCache, check_cache
from paramserver.client.keyplan import AS_IS_KEYS, KeyPlan, KeyPlanCache
from paramserver.client.replicas import settle
from paramserver.client.session import Session, server_name
from paramserver.client.table import TableHandle, prefault
from paramserver.errors import ConfigError, RemoteError
from paramserver.parallel import halves
from paramserver.partition import in_numpy, split_by_owner
from paramserver.spec import TableSpec
from paramserver.wire.codec import decode_rows
from paramserver.wire.protocol import SLOT_MIN_BYTES, slot_end
from paramserver.wire.transport import Future, Message, gather

__all__ = ["SparseTable"]

log = logging.getLogger(__name__)

ASSIGN_ROWS = 1 << 18  # rows per assign request (servers refuse more than Limits.request_keys)
COPY_SPLIT_BYTES = 1 << 21  # a reply copied into the result from this size on in two halves


def place_reply(plan: KeyPlan, p: int, part: np.ndarray, out: np.ndarray) -> None:
    """Put the rows of the reply to part ``p`` of ``plan`` where the list wants them in ``out``
    (repeated keys get their row copied to each of their positions)."""
    small = in_numpy(len(out))
    if len(plan.parts) == 1 and plan.parts[0][1] is None:
        if plan.inverse is None:  # NumPy's copy releases the GIL: halves on two cores
            halves(np.copyto, [out, part], split_at=COPY_SPLIT_BYTES)
        elif small:
            np.take(part, plan.inverse, axis=0, out=out)
        else:
            from paramserver.client.kernels import expand_rows  # numba: on first use

            expand_rows(part, plan.inverse, out)
        return
    positions, rows, bounds = plan.placement()
    a, b = bounds[p], bounds[p + 1]
    if small:
        out[positions[a:b]] = part[rows[a:b]]
        return
    from paramserver.client.kernels import place_rows  # numba: on first use

    place_rows(part, rows[a:b], positions[a:b], out)


class SparseTable(TableHandle):
    """Handle on a sparse table: rows of width ``dim`` keyed by uint64 ids.

    A key list sent again (the same features every step, ps-lite's benchmark shape) is cached
    after its third sighting: the worker reuses its dedup and routing, and the servers keep
    the resolved rows, so later requests carry a signature instead of the keys (OSDI 2014).

    Example:
        rows = emb.pull(np.array([7, 42, 7], dtype=np.uint64))   # (3, dim)
        emb.push(keys, grads).result()
    """

    def __init__(self, client: Session, spec: TableSpec, cache: CacheSpec | None = None) -> None:
        super().__init__(client, spec)
        self._plans = KeyPlanCache(client.ring, max(client.ring_servers) + 1)
        self._ring_version = client.ring_version
        self._sum_buf: np.ndarray | None = None  # a push's summed gradient (see _sum_buffer)
        self._sum_busy: Future[None] | None = None  # the push that sent it
        self._residuals: Any = None  # SparseFeedback of an encoded push (client.feedback)
        self.served_staleness = 0  # the largest staleness the servers reported to the last pull
        # the worker-side row cache (``cache=``, see paramserver.client.cache); None when off
        self.cache: RowCache | None = None
        self._flushes: list[Future[None]] = []
        self._miss_buf: np.ndarray | None = None  # rows fetched for a cached pull's misses
        self._miss_busy: Future[np.ndarray] = gather([], "no pull", lambda _: np.empty(0))
        self._moved = [0, 0]  # distinct rows sent for: pulls, pushes (see traffic())
        check_cache(self.name, spec.mode[0], cache)
        if cache is not None:
            self.cache = RowCache(cache, spec.dim, self.dtype)
            client.before_clock.append(self.flush)

    def plans(self) -> KeyPlanCache:
        """The key plans, made afresh when the worker's ring changed (servers joined or left)."""
        c = self.client
        if self._ring_version != c.ring_version:
            self._plans = KeyPlanCache(c.ring, max(c.ring_servers) + 1)
            self._ring_version = c.ring_version
        return self._plans

    @property
    def dim(self) -> int:
        return self.spec.dim

    def pull_async(
        self, keys: Any, *, create: bool = True, timeout: float | None = None
    ) -> Future[np.ndarray]:
        """Start a pull and return its future (overlap it with compute).

        Example:
            nxt = emb.pull_async(next_keys); ...; rows = nxt.result()
        """
        c = self.client
        c.check()
        limit = c.timeouts.request if timeout is None else timeout
        k = as_keys(keys, self.name)
        if self.cache is not None and create:
            return self._pull_cached(k, limit)
        return self._pull_servers(k, create, limit)

    def _pull_servers(
        self,
        k: np.ndarray,
        create: bool,
        timeout: float,
        record: bool = True,
        dest: np.ndarray | None = None,
    ) -> Future[np.ndarray]:
        c = self.client
        limit = timeout
        flat = k.reshape(-1)
        # no key-list signatures with replication: a read may move to another copy
        cacheable = create and c.replication == 1
        plans = self.plans()
        # a long fresh list to one server goes before its dedup, made when the push of the same
        # batch needs it (a pull alone never pays for it); a list seen lately reuses its plan
        early = (
            None
            if len(flat) < AS_IS_KEYS or plans.known(flat, cacheable)
            else plans.sent_as_is(flat)
        )
        plan, sig = plans.plan(flat, cacheable) if early is None else (early, None)
        self._moved[0] += len(plan.base)
        header = self.pull_header(create, limit)
        futs: list[Future[None]] = []
        staleness: list[int] = []
        codec = self.spec.codec
        # one server's rows of distinct keys in list order are the result as they are: where
        # the server gathered them in a shared slot, handed out (wire/slots.py), if it may be
        lend = dest is None and codec == "none" and plan.inverse is None and len(plan.parts) == 1
        # else the user's array: every server's rows go straight into it, each to where its keys
        # are in the list (repeated keys expanded there), by compiled kernels
        if dest is None:
            out, fresh = self.results.take((len(flat), self.dim), self.dtype)
        else:
            out, fresh = dest, False
        row_bytes = self.dim * self.dtype.itemsize
        # the request's callbacks reach the result through ``box``, emptied once it is done:
        # they live on in reference cycles until the garbage collector runs, and the pool
        # takes a result back only when nothing holds it any more
        box = [out]

        def into(p: int, n: int) -> Callable[[Message], None]:
            def parse(msg: Message) -> None:
                staleness.append(int(msg[0].get("staleness") or 0))
                try:
                    part = decode_rows(msg[1], codec, self.dim, self.dtype)
                except ValueError as exc:
                    raise ConfigError(f"table {self.name!r}: {exc}") from None
                if part.shape != (n, self.dim):
                    raise ConfigError(f"table {self.name!r}: server answered {part.shape} rows")
                if msg[0].get("lent"):  # the slot's rows are the result (nobody else's)
                    box[0] = part
                    return
                place_reply(plan, p, part, box[0])

            return parse

        sent: list[int] = []
        for p, (s, _, part_keys) in enumerate(plan.parts):
            h, arrays = signed_part(header, sig, plan, s, sent, part_keys, [])
            futs.append(
                c.request_server(
                    s,
                    h,
                    arrays,
                    what=f"pull of {len(part_keys)} keys of table {self.name!r} from "
                    f"{server_name(s)} ({c.endpoint.address_of(server_name(s))})",
                    parse=into(p, len(part_keys)),
                    reply_bytes=len(part_keys) * row_bytes,
                    lend=lend,
                )
            )
        # fresh memory is mapped on first write: have that happen while the servers work
        if fresh:
            prefault(out)
        del out
        if early is not None:
            plans.sent(early, cacheable)
        if len(plan.parts) > 1:
            plan.placement()  # where each server's rows go, also while they work

        def combine(_: list[None]) -> np.ndarray:
            plan.known.update(sent)
            self.served_staleness = max(staleness, default=0)
            if record:
                self.record_staleness(staleness)
            return box.pop().reshape((*k.shape, self.dim))

        def again() -> Future[np.ndarray]:
            return self._pull_servers(k, create, timeout, record, dest)

        # sent back by a source it ran ahead of (a move): asked again by the new ring
        redo = c.rerouting(futs, again)
        fut = gather(futs, f"pull of table {self.name!r}", combine, redo)
        if sig is None:
            return fut
        return self._retry_unknown(fut, plan, again)

    def _pull_cached(self, k: np.ndarray, limit: float) -> Future[np.ndarray]:
        # serve the rows cached fresh enough, fetch the others (see paramserver.client.cache)
        cache = self.cache
        assert cache is not None
        flat = k.reshape(-1)
        out, fresh = self.results.take((len(flat), self.dim), self.dtype)
        if fresh:
            prefault(out)
        clock = self.client.current_clock
        miss, served = cache.read(flat, clock, out)
        shape = (*k.shape, self.dim)
        what = f"pull of table {self.name!r}"
        box = [out]
        if len(miss) == 0:
            self.record_staleness([served])
            return gather([], what, lambda _: box.pop().reshape(shape))

        def place(rows: list[np.ndarray]) -> np.ndarray:
            s = self.served_staleness
            cache.fill(flat, miss, rows[0].reshape(-1, self.dim), clock, s, box[0])
            self.record_staleness([served, s])
            return box.pop().reshape(shape)

        # the fetched rows land in a buffer of the table's, reused once copied out (pages
        # mapped), unless a cached pull still in flight holds it
        n = len(miss)
        buf = self._miss_buf
        if buf is None or buf.shape[0] < n or not self._miss_busy.done():
            buf = self._miss_buf = np.empty(
                (max(n, 0 if buf is None else len(buf)), self.dim), self.dtype
            )
        fetch = self._pull_servers(flat[miss], True, limit, False, buf[:n])
        self._miss_busy = gather([fetch], what, place)
        return self._miss_busy

    def _retry_unknown(self, fut: Future[Any], plan: KeyPlan, again: Any) -> Future[Any]:
        """A server that lost a key list (restarted, or evicted it) answers ``unknown_sig``:
        forget the plan and send the request again with its keys."""
        outer: Future[Any] = Future(self.client.endpoint, fut.what)

        def done(f: Future[Any]) -> None:
            err = f.exception(0)  # done: no wait
            if isinstance(err, RemoteError) and err.code == "unknown_sig":
                self._plans.forget(plan)
                plan.sig = None
                retry = again()
                retry.add_done_callback(lambda r: settle(outer, r))
            elif err is not None:
                outer.set_exception(err)
            else:
                outer.set_result(f.result(0))

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
        c.check()
        k = as_keys(keys, self.name)
        flat = k.reshape(-1)
        # without a cache the values are checked where the sum of repeated keys reads them
        g = self.check_grads(grads, (*k.shape, self.dim), scan=self.cache is not None)
        g = g.reshape(len(flat), self.dim)
        if self.cache is not None:
            if self.cache.add(flat, g):
                return self.flush()
            return gather([], f"push to table {self.name!r}", lambda _: None)
        return self._push_flat(flat, g, unchecked=True)

    def assign(self, keys: Any, rows: Any, *, timeout: float | None = None) -> None:
        """Write ``rows`` into the table as the rows of ``keys`` (creating missing ones), and
        wait until every server has applied them. ``rows`` ``(len(keys), dim)`` in the table's
        dtype sets the weights and resets each row's optimizer state to a new row's; rows as
        wide as a checkpoint's (``dim * (1 + n_slots) + n_scalars``) set the state too. A
        repeated key keeps its last row. Applied after this worker's earlier pushes, like an
        async push (under ``sync``: at once, not at the clock's end). Wrong shape or dtype, NaN
        or Inf: ConfigError, and nothing is sent.

        Example:
            emb.assign(np.array([7, 42], np.uint64), np.zeros((2, emb.dim), np.float32))
        """
        c = self.client
        c.check()
        limit = c.timeouts.request if timeout is None else timeout
        k = as_keys(keys, self.name).reshape(-1)
        opt = self.spec.optimizer
        widths = (self.dim, self.dim * (1 + opt.n_slots) + opt.n_scalars)
        r = rows if isinstance(rows, np.ndarray) else np.asarray(rows)
        if r.dtype != self.dtype or r.ndim != 2 or r.shape[0] != len(k) or r.shape[1] not in widths:
            raise ConfigError(
                f"table {self.name!r}: assign takes {self.dtype} rows of shape "
                f"({len(k)}, {widths[0]}) (or ({len(k)}, {widths[1]}) with the optimizer "
                f"state), got {r.dtype} of shape {r.shape}; nothing was sent"
            )
        if not all_finite(r):
            raise ConfigError(
                f"table {self.name!r}: the rows to assign contain NaN or Inf; nothing was sent"
            )
        self.flush().result(limit)  # gradients kept by the row cache go first
        r = np.ascontiguousarray(r)
        n = max(c.ring_servers) + 1  # ranks on the ring (servers join and leave)
        order, bounds = split_by_owner(c.ring.route(k), n)
        futs: list[Future[Any]] = []
        head = {"kind": "assign", "table": self.name, "rank": c.rank}
        for s in range(n):
            mine = order[bounds[s] : bounds[s + 1]]  # in the list's order: the last row wins
            for a in range(0, len(mine), ASSIGN_ROWS):
                part = mine[a : a + ASSIGN_ROWS]
                futs.append(
                    c.request_server(
                        s,
                        {**head, "seq": c.next_seq()},
                        [k[part], r[part]],
                        what=f"assign of {len(part)} rows of table {self.name!r} on "
                        f"{server_name(s)}",
                    )
                )
        gather(futs, f"assign to table {self.name!r}", lambda _: None).result(limit)
        if self.cache is not None:
            self.cache.forget()

    def traffic(self) -> dict[str, int]:
        """Rows this handle asked the servers for and sent them (distinct keys per request),
        and the bytes those are (a key and a row each way, before any codec).

        Example:
            emb.traffic()   # {'rows_pulled': 120000, 'rows_pushed': 80000, 'bytes': ...}
        """
        pulled, pushed = self._moved
        per_row = 8 + self.dim * self.dtype.itemsize
        return {"rows_pulled": pulled, "rows_pushed": pushed, "bytes": (pulled + pushed) * per_row}

    def flush(self) -> Future[None]:
        """Send the gradients the cache kept (one push, repeated keys summed); ``clock()``
        calls it. Returns the push's future (done at once if nothing was kept).

        Example:
            emb.flush().result()
        """
        for f in self._flushes:
            err = f.exception(0) if f.done() else None
            if err is not None:
                self._flushes = []
                raise err
        self._flushes = [f for f in self._flushes if not f.done()]
        pending = None if self.cache is None else self.cache.take_pending()
        if self.cache is None or pending is None:
            return gather([], f"flush of table {self.name!r}", lambda _: None)
        fut = self._push_flat(*pending)
        self.cache.release(fut)
        self._flushes.append(fut)
        return fut

    def _push_flat(self, flat: np.ndarray, g: np.ndarray, unchecked: bool = False) -> Future[None]:
        """Push ``g`` for the keys ``flat``; ``unchecked``: ``g``'s values are not checked yet
        (checked here, in the sum's pass when keys repeat; refused before anything is sent)."""
        mode, _ = self.spec.mode
        plan, sig = self.plans().plan(
            flat, cacheable=mode != "sync" and self.client.replication == 1
        )
        reject = self.spec.nonfinite == "reject"
        if plan.inverse is None:
            summed = g  # distinct keys: the gradient goes as it is, in the list's order
            finite = unchecked and reject and all_finite(g)
            if unchecked and reject and not finite:
                self.refuse_nonfinite()
        else:
            from paramserver.client.kernels import sum_rows_checked  # numba: loaded on first use

            in_slot = self._sum_in_slot(plan)
            summed = self._sum_buffer(len(plan.base)) if in_slot is None else in_slot
            # a sum that is not finite: NaN or Inf in g, or finite values that overflowed
            # (sent: the servers refuse it, as they did before the worker checked sums)
            finite = sum_rows_checked(plan.inverse, g, summed)
            if not finite and unchecked and reject and not all_finite(g):
                self.refuse_nonfinite()
        self._moved[1] += len(plan.base)
        header = self.push_header()
        values = [summed]
        codec = self.spec.push_codec
        if finite and reject and (codec is None or codec == "none"):
            header["checked"] = True  # a server need not scan what lies in a shared slot
        if codec is not None and codec != "none":  # rounded, the residuals kept for next time
            header["codec"] = codec
            values = self._feedback().encode(plan.base, summed, codec)
        fut = self._send_push(plan, sig, header, values)
        if self._sum_buf is not None and summed.base is self._sum_buf and values[0] is summed:
            self._sum_busy = fut
        return fut

    def _feedback(self) -> Any:
        """The residual rows of this table's encoded pushes (numba: loaded on first use)."""
        if self._residuals is None:
            from paramserver.client.feedback import SparseFeedback

            self._residuals = SparseFeedback(self.dim, self.dtype)
        return self._residuals

    def _sum_in_slot(self, plan: KeyPlan) -> np.ndarray | None:
        """Rows to sum a push's gradient into where the request will carry it: in a free
        shared slot with its one server, at the offset :func:`encode` gives it after the keys
        (which need not be sent; a retry sends them), so that nothing copies it there. None
        when the push goes to several servers or copies, is encoded, or no slot is free."""
        c, n = self.client, len(plan.base)
        codec = self.spec.push_codec
        nbytes = n * self.dim * self.dtype.itemsize
        if len(plan.parts) != 1 or c.replication != 1 or nbytes < SLOT_MIN_BYTES:
            return None
        if codec is not None and codec != "none":
            return None
        s, idx, part_keys = plan.parts[0]
        pool = None if idx is not None else c.slot_pool(s)
        return (
            None if pool is None else pool.array(slot_end([part_keys]), self.dtype, (n, self.dim))
        )

    def _sum_buffer(self, n: int) -> np.ndarray:
        """Rows to sum a push's gradient into: the table's buffer, its pages mapped by earlier
        pushes, unless a push still in flight holds it (then a new one, kept for later)."""
        buf = self._sum_buf
        busy = self._sum_busy is not None and not self._sum_busy.done()
        if buf is None or busy or buf.shape[0] < n:
            buf = np.empty((max(n, 0 if buf is None else buf.shape[0]), self.dim), self.dtype)
            self._sum_buf = buf
        return buf[:n]

    def _send_push(
        self, plan: KeyPlan, sig: int | None, header: dict[str, Any], values: list[np.ndarray]
    ) -> Future[None]:
        c = self.client
        futs: list[Future[Any]] = []
        sent: list[int] = []
        for s, idx, part_keys in plan.parts:
            part = values if idx is None else [v[idx] for v in values]
            h, arrays = signed_part(header, sig, plan, s, sent, part_keys, part)
            futs.append(
                c.request_server(
                    s,
                    h,
                    arrays,
                    what=f"push of {len(part_keys)} rows of table {self.name!r} to {server_name(s)}",
                    reply_bytes=0,
                )
            )
        c.endpoint.poll(0)

        def acked(_: list[Any]) -> None:
            plan.known.update(sent)

        servers = [(s, len(part_keys)) for s, _, part_keys in plan.parts]
        fut = gather_push(c.endpoint, futs, servers, f"push to table {self.name!r}", acked)
        if sig is None:
            return fut
        # a retry keeps the sequence number: a server that applied the first try skips it
        return self._retry_unknown(fut, plan, lambda: self._send_push(plan, None, header, values))


def signed_part(
    header: dict[str, Any],
    sig: int | None,
    plan: KeyPlan,
    s: int,
    sent: list[int],
    keys: np.ndarray,
    rest: list[np.ndarray],
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The header and arrays of server ``s``'s part of a request (its ``keys``, then ``rest``).
    With a key-list signature ``sig``, a server that knows the list gets the signature without
    the keys; another gets both and is added to ``sent`` (it knows the list once it answered).

    Example:
        h, arrays = signed_part(header, sig, plan, s, sent, part_keys, [grads])
    """
    if sig is None:
        return header, [keys, *rest]
    if s in plan.known:
        return {**header, "sig": sig}, list(rest)
    sent.append(s)
    return {**header, "sig": sig}, [keys, *rest]


def gather_push(
    endpoint: Any,
    futs: list[Future[Any]],
    servers: list[tuple[int, int]],
    what: str,
    acked: Callable[[list[Any]], None],
) -> Future[None]:
    """One future for a push's requests to its servers (``servers``: rank and keys of each),
    completed when every server has answered. A push refused by some servers (``full``: a
    table at its max_rows there) is not taken back on the others: the error then says
    exactly which servers applied their part and which refused it."""
    if not futs:
        return gather(futs, what, acked)
    group: Future[None] = Future(endpoint, what)
    left = [len(futs)]

    def one_done(_: Future[Any]) -> None:
        left[0] -= 1
        if left[0]:
            return
        failed = [(s, f.exception(0)) for (s, _), f in zip(servers, futs, strict=True)]
        refused = [(s, e) for s, e in failed if e is not None]
        if not refused:
            acked([f.result(0) for f in futs])
            group.set_result(None)
            return
        applied = [
            f"{server_name(s)} ({n} keys)"
            for (s, n), (_, e) in zip(servers, failed, strict=True)
            if e is None
        ]
        first = refused[0][1]
        assert first is not None
        if applied and isinstance(first, RemoteError):
            names = ", ".join(server_name(s) for s, _ in refused)
            first = RemoteError(
                f"{first}; the push was refused by {names} but applied on "
                f"{', '.join(applied)} (those rows changed, the refused ones did not)",
                code=first.code,
            )
        group.set_exception(first)

    for f in futs:
        f.add_done_callback(one_done)
    return group
