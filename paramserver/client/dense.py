"""The handle on a dense table: one array, its ranges on the servers, same-host shared memory
and the TCP bulk channel."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from paramserver.arrays import all_finite, copy_finite
from paramserver.client.replicas import live_copies
from paramserver.client.session import Session, server_name
from paramserver.client.table import SharedResults, TableHandle, prefault
from paramserver.errors import ConfigError, RemoteError
from paramserver.loading import use_kernels
from paramserver.parallel import SPLIT_BYTES
from paramserver.spec import TableSpec
from paramserver.wire import bulk, shm
from paramserver.wire.codec import decode_flat
from paramserver.wire.transport import (
    Future,
    Message,
    gather,
)

__all__ = ["DenseTable"]

log = logging.getLogger(__name__)

# reply regions of a table's shared segment: a loop that holds one result while it pulls the
# next, the region a push refreshes for that pull, and one kept back for copies
REPLY_REGIONS = 3


class DenseTable(TableHandle):
    """Handle on a dense table: one array of ``shape``.

    With servers on the same host (and ``transport="auto"``) values travel through a shared
    memory segment per table and worker: only headers go over the socket.

    Example:
        w = dense.pull(); dense.push(np.ones_like(w)).result()
    """

    def __init__(self, client: Session, spec: TableSpec) -> None:
        super().__init__(client, spec)
        self._seg: shm.Segment | None = None
        self._regions: SharedResults | None = None  # the segment's reply regions
        self._shm_tried = False
        self._lane_servers: Counter[int] = Counter()  # client.replaced when the lane was made
        self._last_push: Future[None] | None = None
        self._sendbuf: np.ndarray | None = None
        self._recvbuf: np.ndarray | None = None
        self._residuals: Any = None  # DenseFeedback of encoded pushes (client.feedback)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def shared_memory(self) -> bool:
        """Whether this table's values travel through shared memory (decided on first use)."""
        self._lane()
        return self._seg is not None

    def _lane(self) -> shm.Segment | None:
        """The shared-memory segment, attached to every server of the table on first use."""
        if self._shm_tried:
            return self._seg
        c = self.client
        # with replication, async/ssp copies each write their own values into the worker's
        # copy as they apply a push (the mirror), and copies differ in the order they apply
        # pushes: such a table goes over TCP, read from one copy
        if c.transport != "auto" or (c.replication > 1 and self.spec.mode[0] != "sync"):
            self._shm_tried = True
            return None
        nbytes = self.spec.size * self.dtype.itemsize
        # fewer reply regions where /dev/shm has no room for more (every pull then copies)
        replies = REPLY_REGIONS
        seg = shm.create(nbytes, regions=1 + replies)
        if seg is None:
            replies = 1
            seg = shm.create(nbytes, regions=2)
        if seg is None:
            self._shm_tried = True
            return None
        ok = True
        # every copy of a range reads pushes from the segment, and any may answer a pull
        holders = sorted(
            {r for s, _, _ in self.spec.ranges for r in live_copies(c, s)}
            if c.replication > 1
            else {s for s, _, _ in self.spec.ranges}
        )
        try:
            futs = [
                c.endpoint.request(
                    server_name(s),
                    {
                        "kind": "attach",
                        "table": self.name,
                        "rank": c.rank,
                        "path": seg.path,
                        "nonce": seg.nonce,
                        "replies": replies,
                    },
                    what=f"attaching shared memory for table {self.name!r} on {server_name(s)}",
                )
                for s in holders
            ]
            for f in futs:
                try:
                    f.result(c.timeouts.request)
                except RemoteError as exc:  # another host, or no /dev/shm there: use TCP
                    log.info("table %r: shared memory refused (%s); using TCP", self.name, exc)
                    ok = False
        except BaseException:
            seg.close()
            raise
        seg.unlink()  # every server has mapped it (or refused): no name left to clean up
        self._shm_tried = True
        if ok:
            self._seg = seg
            self._regions = SharedResults(
                [seg.typed(1 + i, self.dtype, self.spec.size) for i in range(replies)]
            )
            self._lane_servers = Counter(c.replaced)
        else:
            seg.close()
        return self._seg

    def move_to(self, ranges: list[tuple[int, int, int]]) -> None:
        """Route by ``ranges`` from now on (a join or a drain placed the table anew:
        client/ring.py); the shared memory is attached to the new servers on next use."""
        self.spec = self.spec.with_ranges(ranges)
        # (in-flight pulls and the results handed out keep the old one alive)
        self._seg, self._regions, self._shm_tried = None, None, False

    def _wait_push(self) -> None:
        # its error, if any, belongs to whoever holds that push's future
        if self._last_push is not None:
            try:
                self._last_push.exception()
            finally:
                self._last_push = None

    def _bulk(self, s: int, a: int, b: int) -> bool:
        """Whether range [a:b] to and from server ``s`` may take the bulk channel (opened on
        first use; without it, ZeroMQ frames)."""
        c = self.client
        return (
            c.replication == 1  # (its raw bytes go to one named server, not to every copy)
            and (b - a) * self.dtype.itemsize >= bulk.MIN_BYTES
            and c.transport != "zmq"
            and bulk.open_channel(c.endpoint, server_name(s), c.rank, c.timeouts.heartbeat_timeout)
        )

    def _over_tcp(self, s: int) -> bool:
        """Whether server ``s`` took over after the segment was shared: reach it by TCP."""
        return self.client.replaced[s] != self._lane_servers[s]

    def push_buffer(self) -> np.ndarray:
        """A writable array of the table's shape to compute a gradient into; ``push(buf)`` then
        sends it without a copy (on the same host the server reads it where it lies). Waits
        until the previous push was applied; the contents are undefined until written.

        Example:
            buf = dense.push_buffer(); np.multiply(x, 0.5, out=buf); dense.push(buf)
        """
        self.client.check()
        seg = self._lane()
        self._wait_push()
        if seg is not None:
            return seg.grad.view(self.dtype)[: self.spec.size].reshape(self.shape)
        if self._sendbuf is None:
            self._sendbuf = np.empty(self.shape, self.dtype)
        return self._sendbuf

    def pull_async(
        self,
        *,
        timeout: float | None = None,
        out: np.ndarray | None = None,
        copy: bool = True,
    ) -> Future[np.ndarray]:
        """Start a pull of the whole array and return its future (see :meth:`pull`)."""
        c = self.client
        c.check()
        limit = c.timeouts.request if timeout is None else timeout
        if out is not None and (
            not isinstance(out, np.ndarray)
            or out.dtype != self.dtype
            or out.shape != self.shape
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ConfigError(
                f"table {self.name!r}: out must be a writeable C-contiguous {self.dtype} array "
                f"of shape {self.shape}"
            )
        seg = self._lane()
        regions = self._regions
        named = None
        if seg is not None:
            assert regions is not None
            named = regions.name(out is None and copy, always_dirty=c.replication > 1)
            if named is None:  # every region is held (by results, by pulls in flight): TCP
                seg = None
        header = self.pull_header(True, limit)
        # the region the servers write (held by this request until it is answered) and whether
        # it is the result itself (see SharedResults)
        target: np.ndarray | None = None
        lent = False
        if seg is not None:
            assert named is not None and regions is not None
            r, dirty, lent = named
            header.update(shm=True, region=r)
            if dirty:
                header["dirty"] = True
            target = regions.arrays[r]
        # values that cross the network come encoded if the table has a codec
        codec = self.spec.codec if seg is None and self.spec.codec != "none" else None
        if codec is not None:
            header["codec"] = codec
        staleness: list[int] = []

        def part(msg: tuple[dict[str, Any], list[np.ndarray]]) -> np.ndarray | None:
            staleness.append(int(msg[0].get("staleness") or 0))
            if seg is not None:
                if not msg[0].get("shm") or msg[1]:
                    raise ConfigError(f"table {self.name!r}: server did not answer in memory")
                return None
            if msg[0].get("bulk"):  # raw bytes from the bulk channel
                raw = msg[1][0]
                return raw.view(self.dtype) if raw.nbytes % self.dtype.itemsize == 0 else raw
            return msg[1][0]

        def part_by_tcp(a: int, b: int) -> Callable[[Message], None]:
            # a replacement server has no shared memory: its rows go where the others wrote
            def parse(msg: Message) -> None:
                staleness.append(int(msg[0].get("staleness") or 0))
                assert target is not None
                if len(msg[1]) != 1 or msg[1][0].shape != (b - a,):
                    raise ConfigError(f"table {self.name!r}: server answered a wrong shape")
                target[a:b] = msg[1][0]

            return parse

        def decoded(a: int, b: int) -> Callable[[Message], np.ndarray]:
            def parse(msg: Message) -> np.ndarray:
                staleness.append(int(msg[0].get("staleness") or 0))
                assert codec is not None
                try:
                    return decode_flat(msg[1], codec, b - a, self.dtype)
                except ValueError as exc:
                    raise ConfigError(f"table {self.name!r}: {exc}") from None

            return parse

        tcp_header = {k: v for k, v in header.items() if k not in ("shm", "region", "dirty")}

        ranges = self.spec.ranges
        # over TCP, replies are assembled straight into the result (no second copy)
        dest = None
        # a plain pull's result: memory mapped by earlier results when the caller let go of
        # them (see ResultPool), else fresh memory mapped while the servers work
        result: np.ndarray | None = None
        fresh = False
        if out is None and copy and not lent:
            result, fresh = self.results.take(self.shape, self.dtype)
            if fresh and seg is None:  # TCP replies land in it as they come: map it first
                prefault(result)
        if seg is None:
            if out is None and not copy:  # a read-only view of a reused receive buffer
                if self._recvbuf is None:
                    self._recvbuf = np.empty(self.shape, self.dtype)
                out_ = self._recvbuf
            else:
                picked = out if out is not None else result
                assert picked is not None
                out_ = picked
            dest = out_.reshape(-1)
        item = self.dtype.itemsize
        futs = [
            c.request_server(
                s,
                header,
                what=f"pull of table {self.name!r} [{a}:{b}] from {server_name(s)} "
                f"({c.endpoint.address_of(server_name(s))})",
                parse=part if codec is None else decoded(a, b),
                sink=None
                if dest is None or codec is not None
                else dest.view(np.uint8)[a * item : b * item],
                bulk=codec is None and self._bulk(s, a, b),
            )
            if seg is None
            else c.request_server(
                s,
                tcp_header if self._over_tcp(s) else header,
                what=f"pull of table {self.name!r} [{a}:{b}] from {server_name(s)} "
                f"({c.endpoint.address_of(server_name(s))})",
                parse=part_by_tcp(a, b) if self._over_tcp(s) else part,
                again=lambda a=a, b=b: (tcp_header, [], part_by_tcp(a, b)),  # type: ignore[misc]
            )
            for s, a, b in ranges
        ]
        if fresh and seg is not None:  # the server writes the shared reply meanwhile
            assert result is not None
            prefault(result)

        def combine(results: list[np.ndarray | None]) -> np.ndarray:
            self.record_staleness(staleness)
            if seg is not None:
                assert target is not None and regions is not None
                view = target.reshape(self.shape)

                def copied(dst: np.ndarray) -> np.ndarray:
                    # (NumPy for a small copy, and while the kernels load: paramserver.loading)
                    if view.nbytes < SPLIT_BYTES or not use_kernels():
                        np.copyto(dst, view)
                        return dst
                    # read next by the caller, not from this core's cache: streamed
                    from paramserver.nontemporal import copy as streamed

                    streamed(view, dst)
                    return dst

                if out is not None:
                    return copied(out)
                if lent:  # the region itself: nothing writes it while anyone holds it
                    regions.handed += 1
                    return view
                if copy:
                    assert result is not None
                    return copied(result)
                ro = view.view()
                ro.flags.writeable = False
                return ro
            assert dest is not None
            for (_, a, b), r in zip(ranges, results, strict=True):
                assert r is not None
                if r.shape != (b - a,):
                    raise ConfigError(f"table {self.name!r}: server answered shape {r.shape}")
                if r.ctypes.data != dest[a:b].ctypes.data:
                    dest[a:b] = r
            res = dest.reshape(self.shape)
            if out is None and not copy:
                res = res.view()
                res.flags.writeable = False
            return res

        def again() -> Future[np.ndarray]:  # sent back by a source it ran ahead of (a move)
            return self.pull_async(timeout=timeout, out=out, copy=copy)

        return gather(futs, f"pull of table {self.name!r}", combine, c.rerouting(futs, again))

    def pull(
        self,
        *,
        timeout: float | None = None,
        out: np.ndarray | None = None,
        copy: bool = True,
    ) -> np.ndarray:
        """Return the whole array: a writable array the caller owns; or written into ``out``
        (reused, no allocation); or, with ``copy=False``, a read-only view of this worker's
        receive buffer, valid until this worker's next push or pull of the table over TCP.

        On the same host both come without a copy: the array is a reply region of the table's
        shared segment, which nothing writes again while the caller (or a view of it, or a
        tensor made from it) holds it; a caller who holds more results than there are regions
        gets copies.

        Example:
            w = dense.pull()
            dense.pull(out=w)                 # refresh in place
            view = dense.pull(copy=False)     # zero-copy, read-only
        """
        limit = self.client.timeouts.request if timeout is None else timeout
        return self.pull_async(timeout=limit, out=out, copy=copy).result(limit + 1.0)

    def push(self, grad: Any) -> Future[None]:
        """Send a gradient of the table's shape; returns at once (``.result()`` waits). Do not
        modify ``grad`` until then. A gradient computed into :meth:`push_buffer` is not copied.
        Over the TCP bulk channel it returns once the parts for all servers, sent at once, were
        written.

        Example:
            dense.push(grad).result()
        """
        c = self.client
        c.check()
        seg = self._lane()
        reject = self.spec.nonfinite == "reject"
        # into shared memory, the copy checks the values in the same pass (copy_finite)
        g = self.check_grads(grad, self.shape, scan=seg is None).reshape(-1)
        if seg is not None:
            mine = seg.grad.view(self.dtype)[: self.spec.size]
            if g.ctypes.data != mine.ctypes.data:
                self._wait_push()  # the server may still be reading the previous gradient
                if not copy_finite(g, mine) and reject:
                    self.refuse_nonfinite()  # (nothing sent: the table is unchanged)
            elif reject and not all_finite(g):
                self.refuse_nonfinite()
        header = self.push_header()
        if seg is not None:
            header["shm"] = True
            # every value was found finite (in the copy, or by a scan of push_buffer()): the
            # servers need not scan it again
            header["checked"] = self.spec.nonfinite == "reject"
            # the servers write the new values into a free reply region in the same pass (the
            # next pull names it and finds them there); none where every region is held
            assert self._regions is not None
            named = self._regions.name(False, always_dirty=c.replication > 1)
            if named is not None:
                header["region"] = named[0]
                if named[1]:
                    header["dirty"] = True
            arrays: list[list[np.ndarray]] = [[] for _ in self.spec.ranges]
        elif self.spec.push_codec not in (None, "none"):  # rounded, the residual kept
            codec = self.spec.push_codec
            assert codec is not None
            header["codec"] = codec
            if self._residuals is None:
                from paramserver.client.feedback import DenseFeedback

                self._residuals = DenseFeedback(self.spec.size, self.dtype)
            arrays = [self._residuals.encode(g, a, b, codec) for _, a, b in self.spec.ranges]
        else:
            if self._sendbuf is not None and g.ctypes.data == self._sendbuf.ctypes.data:
                self._wait_push()
            arrays = [[g[a:b]] for _, a, b in self.spec.ranges]
        if seg is not None:
            # a replacement server has no shared memory: it gets its part of the gradient by TCP
            tcp_header = {
                k: v for k, v in header.items() if k not in ("shm", "checked", "region", "dirty")
            }
            grad = seg.grad.view(self.dtype)
            tcp = {s: (tcp_header, [grad[a:b]], None) for s, a, b in self.spec.ranges}
            for i, (s, _, _) in enumerate(self.spec.ranges):
                if self._over_tcp(s):
                    arrays[i] = tcp[s][1]
        # over TCP, the parts go to every server at once, ahead of their headers
        ranges = self.spec.ranges
        # (encoded values never take the bulk channel)
        plain = seg is None and "codec" not in header
        use = [plain and self._bulk(s, a, b) for s, a, b in ranges]
        parts = [(server_name(s), g[a:b].data.cast("B")) if u else None
                 for (s, a, b), u in zip(ranges, use, strict=True)]  # fmt: skip
        went = bulk.presend(c.endpoint, parts, f"push to table {self.name!r}") if any(use) else []
        futs = [
            c.request_server(
                s,
                tcp[s][0] if seg is not None and self._over_tcp(s) else header,
                arr,
                what=f"push to table {self.name!r} [{a}:{b}] on {server_name(s)}",
                again=None if seg is None else (lambda s=s: tcp[s]),  # type: ignore[misc]
                bulk=use[i],
            )
            if not (went and went[i])
            else c.request_server(
                s,
                {**header, "bulk": arr[0].nbytes},
                what=f"push to table {self.name!r} [{a}:{b}] on {server_name(s)}",
                again=lambda h=header, arr=arr: (h, arr, None),  # type: ignore[misc]
            )
            for i, ((s, a, b), arr) in enumerate(zip(ranges, arrays, strict=True))
        ]
        c.endpoint.poll(0)
        fut: Future[None] = gather(futs, f"push to table {self.name!r}", lambda _: None)
        self._last_push = fut
        return fut

    def assign(self, values: Any, *, timeout: float | None = None) -> None:
        """Write ``values`` (the table's shape and dtype) into the table and reset the
        optimizer state to a new table's; wait until every server has applied its range.
        ``values`` of shape ``(size, 1 + n_slots + n_scalars)`` (a checkpoint's rows: per
        element the value, then its state) sets the state too. Applied after this worker's
        earlier pushes, like an async push. Wrong shape or dtype, NaN or Inf: ConfigError,
        and nothing is sent.

        Example:
            dense.assign(np.zeros(dense.shape, dense.dtype))
        """
        c = self.client
        c.check()
        limit = c.timeouts.request if timeout is None else timeout
        v = values if isinstance(values, np.ndarray) else np.asarray(values)
        opt = self.spec.optimizer
        rows = (self.spec.size, 1 + opt.n_slots + opt.n_scalars)
        if v.dtype != self.dtype or (v.shape != self.shape and v.shape != rows):
            raise ConfigError(
                f"table {self.name!r}: assign takes {self.dtype} values of shape {self.shape} "
                f"(or {rows} with the optimizer state), got {v.dtype} of shape {v.shape}; "
                "nothing was sent"
            )
        if not all_finite(v):
            raise ConfigError(
                f"table {self.name!r}: the values to assign contain NaN or Inf; nothing was sent"
            )
        flat = np.ascontiguousarray(v).reshape(-1) if v.shape != rows else np.ascontiguousarray(v)
        self._wait_push()
        futs = [
            c.request_server(
                s,
                {"kind": "assign", "table": self.name, "rank": c.rank, "seq": c.next_seq()},
                [flat[a:b]],
                what=f"assign of table {self.name!r} [{a}:{b}] on {server_name(s)}",
            )
            for s, a, b in self.spec.ranges
        ]
        gather(futs, f"assign to table {self.name!r}", lambda _: None).result(limit)
