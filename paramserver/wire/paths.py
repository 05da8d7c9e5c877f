"""The paths a request's arrays take to a server and back, behind one interface.

A worker's arrays reach a server in one of four ways:

* ZeroMQ frames (any peer);
* a shared-memory *slot* the worker attached (same host; ``slot`` in the header):
  :func:`~paramserver.wire.protocol.decode` finds the arrays there, and the reply's arrays go
  there too (a pull gathers its rows straight into the slot);
* a dense table's shared *segment* (same host; ``shm`` in the header): the gradient lies in the
  worker's segment, and a pull's values go into the segment's reply region;
* the bulk channel (large dense values; ``bulk`` in the header, :mod:`paramserver.wire.bulk`):
  the payload follows its header on a raw TCP connection.

A request handler gets a :class:`Request`: its header, its arrays (:attr:`Request.arrays`, or
:meth:`Request.dense_array` for a dense table's one array, wherever it lies) and a
:class:`Reply` that answers the way the request came. It never learns which path they took.
:class:`Paths` holds a server's side of all four: the slots and segments its workers attached,
the reused receive buffers, the bulk listener.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from paramserver.errors import ConfigError
from paramserver.wire import bulk, protocol, shm
from paramserver.wire.refusal import Refusal
from paramserver.wire.streams import MIN_RATE
from paramserver.wire.transport import Router

__all__ = ["Behind", "DenseLink", "DenseValues", "Paths", "Reply", "Request", "SharedRange"]

log = logging.getLogger(__name__)

_SPARE = 2  # buffers of payloads that waited, kept for the next ones


class DenseValues(Protocol):
    """What a reply needs of a dense range (a server's ``DenseShard``)."""

    @property
    def weights(self) -> np.ndarray:
        """The live values (a read-only view)."""
        ...

    def pull(self, out: np.ndarray | None = None) -> np.ndarray:
        """A copy of the values (into ``out`` if given)."""
        ...


@dataclass
class SharedRange:
    """A worker's shared segment of one dense table, seen at this server's range: ``grad``
    where its pushes' gradients lie, ``replies`` where its pulls' answers go (the worker hands
    them out as results and names one per request), and the version of the values each reply
    region holds (None: not written yet, or the worker let it be written since)."""

    segment: shm.Segment
    grad: np.ndarray
    replies: list[np.ndarray]
    versions: list[int | None]

    def region(self, h: dict[str, Any], where: str) -> int:
        """The reply region a request names (0 if none)."""
        r = int(h.get("region", 0))
        if r >= len(self.replies):
            raise Refusal(
                "invalid",
                f"{where}: reply region {r}, but worker[{h['rank']}]'s segment of table "
                f"{h['table']!r} has {len(self.replies)}",
            )
        return r


@dataclass
class DenseLink:
    """The replies of one dense table on this server: the workers' shared ranges (by rank) and
    the reused buffer of replies in frames. Bulk payloads that view the table's values name it
    as their owner (see :meth:`Paths.changing`)."""

    shared: dict[int, SharedRange] = field(default_factory=dict)
    buf: np.ndarray | None = None
    tracker: Any = None  # libzmq's tracker of the last reply sent from ``buf``

    def close(self) -> None:
        for s in self.shared.values():
            s.segment.close()
        self.shared.clear()


@dataclass
class Behind:
    """The messages one sender sent after its push whose bulk payload is still on its way:
    (frames, when first seen (None: now), bytes), in order, and their bytes together."""

    messages: deque[tuple[list[Any], float | None, int]] = field(default_factory=deque)
    nbytes: int = 0

    def add(self, frames: list[Any], since: float | None) -> None:
        size = sum(memoryview(f).nbytes for f in frames)
        self.messages.append((frames, since, size))
        self.nbytes += size

    def next(self) -> tuple[list[Any], float | None]:
        frames, since, size = self.messages.popleft()
        self.nbytes -= size
        return frames, since


class Paths:
    """A server's side of the paths (see the module docstring).

    Example:
        paths = Paths(router, listener)
        req = paths.receive(identity, frames)      # ProtocolError if malformed
        if paths.fetch(req):                       # a bulk payload behind the header is here
            req.reply.ok()
        for req, refusal in paths.arrived():       # later: the payloads that were not
            ...
    """

    def __init__(self, router: Router, channel: bulk.Listener | None, no_channel: str = "") -> None:
        self.router = router
        self.channel = channel
        self.no_channel = no_channel  # why there is no bulk channel, for the refusal
        self.name = "server[?]"
        # same host: (worker rank, slot id) -> the shared slot its requests use
        self.slots: dict[tuple[int, int], shm.Segment] = {}
        self.links: dict[str, DenseLink] = {}  # dense table name -> its replies
        # reused receive buffers for arrays that arrive in several frames (no page faults per
        # message); an array decoded into one is only valid while its request is handled
        self.scratch: list[np.ndarray] = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
        self.received = 0  # bytes received since the last trim
        # pushes whose bulk payload is still on its way, by sender (one each: the loop keeps
        # a sender's later requests behind it), and the buffers such payloads may reuse
        self.waiting: dict[bytes, Request] = {}
        # the messages (frames, and when they first came) such a sender sent since, in order
        self.behind: dict[bytes, Behind] = {}
        self.spare: list[np.ndarray] = []

    @classmethod
    def bind(cls, router: Router, host: str, *, idle: float, secret: bytes | None) -> Paths:
        """The paths of a server bound at ``host``, with a bulk channel unless its port cannot
        be bound, or the cluster has a token (``secret``, which seals the channel's payloads)
        and the ``cryptography`` package is missing; ``idle``: seconds a bulk peer may stay
        silent mid-payload."""
        if secret is not None and not bulk.can_seal():
            return cls(
                router, None, "a cluster token is set and the cryptography package is missing"
            )
        try:
            return cls(router, bulk.Listener(host, idle=idle, secret=secret))
        except OSError as exc:
            log.warning("no bulk channel (dense values travel in ZeroMQ frames): %s", exc)
            return cls(router, None, "it could not bind")

    def rename(self, name: str) -> None:
        self.name = name
        if self.channel is not None:
            self.channel.name = name

    # ---- requests in ------------------------------------------------------------------------

    def receive(self, identity: bytes, frames: list[Any]) -> Request:
        """Decode one message (ProtocolError if malformed; its arrays may lie in a slot)."""
        self.received += sum(memoryview(f).nbytes for f in frames)
        header, arrays = protocol.decode(frames, self.alloc, self.slot_region)
        if header.get("dirty"):
            self.forget(header)
        if "slot" in header:  # bytes that came in a shared slot count as received too
            self.received += sum(a.nbytes for a in arrays)
        return Request(self, identity, header, arrays)

    def fetch(self, req: Request) -> bool:
        """Take the payload that follows a push's header on the bulk channel, if it announces
        one: first of all, whatever the handler then decides, so the channel stays in step.
        True: the request may be handled now (no payload, or all of it was here already).
        False: the payload is still on its way; the request waits here, the loop serves
        everyone else, and :meth:`arrived` hands it back. Never blocks."""
        h = req.header
        if h["kind"] != "push" or "bulk" not in h:
            return True
        what = f"{self.name}: push to table {h['table']!r} from worker[{h['rank']}]"
        n = h["bulk"]
        try:
            if self.channel is None:
                raise ConnectionError(f"{what}: {self.name} has no bulk channel")
            if not self.channel.connected(req.identity):
                raise ConnectionError(f"{what}: no bulk connection from this worker")
            buf = self.alloc(0, n)[:n]
            here = self.channel.take(req.identity, buf.data, what)
            if not here:  # memory of its own: other requests use the scratch meanwhile
                buf = self.spare_buffer(n)
                self.channel.begin(req.identity, buf.data, what)
                self.waiting[req.identity] = req
        except OSError as exc:
            raise Refusal("bulk", f"{exc}; the table is unchanged") from None
        req.arrays = [buf]
        req.raw = True
        return here

    def arrived(self) -> list[tuple[Request, Refusal | None]]:
        """The pushes :meth:`fetch` left waiting whose payload is over: (request, None) to
        handle now, or (request, the refusal to send: the payload was given up, its bulk
        connection closed). Hand each back with :meth:`settled` once handled."""
        if not self.waiting or self.channel is None:
            return []
        out: list[tuple[Request, Refusal | None]] = []
        for identity, why in self.channel.done(time.monotonic()):
            req = self.waiting.pop(identity)
            refusal = None
            if why is not None:
                refusal = Refusal(
                    "bulk",
                    f"{why}; the table is unchanged and the bulk connection closed: push again "
                    f"(the worker opens a new one), and if this recurs, look at its link to "
                    f"{self.name} (a payload has heartbeat_timeout seconds of grace, then must "
                    f"come at {MIN_RATE} bytes/s or more)",
                )
                req.arrays = []  # its buffer is not reused (:meth:`settled`)
            out.append((req, refusal))
        return out

    def settled(self, req: Request) -> None:
        """A request :meth:`arrived` handed back was handled: its buffer may serve again."""
        if req.arrays and len(self.spare) < _SPARE:
            buf = req.arrays[0]
            self.spare.append(buf if buf.base is None else buf.base)
        req.arrays = []

    def spare_buffer(self, nbytes: int) -> np.ndarray:
        """A buffer of ``nbytes`` for a payload that waits: a spare one (its pages are
        mapped already) or a new one."""
        fits = [i for i, b in enumerate(self.spare) if b.nbytes >= nbytes]
        if not fits:
            return np.empty(nbytes, np.uint8)
        best = min(fits, key=lambda i: self.spare[i].nbytes)
        return self.spare.pop(best)[:nbytes]

    def alloc(self, i: int, nbytes: int) -> np.ndarray:
        if i >= len(self.scratch):
            return np.empty(nbytes, np.uint8)
        if self.scratch[i].nbytes < nbytes:
            self.scratch[i] = np.empty(nbytes, np.uint8)
        return self.scratch[i]

    def slot_region(self, h: dict[str, Any]) -> np.ndarray | None:
        """The shared slot a request names (None: it names none, or one not attached)."""
        slot = h.get("slot")
        seg = None if slot is None else self.slots.get((int(h.get("rank", -1)), slot))
        return None if seg is None else seg.regions[0]

    # ---- attaching --------------------------------------------------------------------------

    def open_channel(self, identity: bytes, rank: int) -> tuple[int, int]:
        """(port, one-time ticket) of the bulk channel for the worker at ``identity``."""
        if self.channel is None:
            raise Refusal("no_bulk", f"{self.name} has no bulk channel: {self.no_channel}")
        return self.channel.port, self.channel.ticket(identity, rank)

    def attach_slot(self, rank: int, slot: int, path: str, nonce: int, size: int) -> None:
        """Map a worker's shared slot (replacing the one it had under that id)."""
        seg = self.map(path, nonce, size, regions=1)
        old = self.slots.pop((rank, slot), None)
        if old is not None:
            old.close()
        self.slots[rank, slot] = seg

    def attach_range(
        self,
        table: str,
        rank: int,
        path: str,
        nonce: int,
        dtype: np.dtype[Any],
        size: int,
        span: range,
        replies: int = 1,
    ) -> None:
        """Map a worker's shared segment of dense table ``table`` (the gradient and ``replies``
        reply regions, each ``size`` elements of ``dtype``); this server reads and writes its
        ``span`` of them."""
        seg = self.map(path, nonce, size * dtype.itemsize, regions=1 + replies)
        link = self.link(table)
        old = link.shared.pop(rank, None)
        if old is not None:
            old.segment.close()
        lo, hi = span.start, span.stop
        link.shared[rank] = SharedRange(
            seg,
            seg.grad.view(dtype)[lo:hi],
            [r.view(dtype)[lo:hi] for r in seg.replies],
            [None] * replies,
        )

    def forget(self, h: dict[str, Any]) -> None:
        """The worker let the reply region a request names be written (it was a result): what
        this server last wrote there is gone, whatever the request then becomes (a sync push
        writes nothing there, a refused one neither)."""
        found = self.links.get(h.get("table", ""))
        shared = None if found is None else found.shared.get(h.get("rank", -1))
        r = h.get("region", 0)
        if shared is not None and r < len(shared.versions):
            shared.versions[r] = None

    def map(self, path: str, nonce: int, nbytes: int, regions: int) -> shm.Segment:
        try:
            return shm.attach(path, nonce, nbytes, regions=regions)
        except OSError as exc:
            raise Refusal("no_shm", f"{self.name} cannot map {path!r}: {exc}") from None

    def link(self, table: str) -> DenseLink:
        link = self.links.get(table)
        if link is None:
            link = self.links[table] = DenseLink()
        return link

    def shared(self, table: str, rank: int) -> SharedRange:
        found = self.links.get(table)
        shared = None if found is None else found.shared.get(rank)
        if shared is None:
            raise Refusal(
                "invalid",
                f"worker[{rank}] has no shared-memory segment attached for table "
                f"{table!r} on {self.name}",
            )
        return shared

    # ---- upkeep -----------------------------------------------------------------------------

    def changing(self, table: str) -> None:
        """Call before a dense table's values change: bulk replies still being written from
        them keep the values they were sent with."""
        link = self.links.get(table)
        if self.channel is not None and link is not None:
            self.channel.release(link)

    def workers_left(self, live: set[int], gone: set[int]) -> None:
        """A new view: workers not in ``live`` lose their slots, the ``gone`` (live until now)
        their bulk connections."""
        for key in [key for key in self.slots if key[0] not in live]:
            self.slots.pop(key).close()
        if self.channel is not None:
            for r in gone:
                self.channel.drop_rank(r)

    def expire(self, now: float) -> None:
        if self.channel is not None:
            self.channel.expire(now)

    def trim(self) -> None:
        """Give back the receive buffers and the slots' pages (mapped again on next use)."""
        self.received = 0
        self.scratch = [np.empty(0, np.uint8) for _ in self.scratch]
        self.spare = []
        for seg in self.slots.values():
            seg.drop_pages()

    def close(self) -> None:
        self.waiting.clear()
        self.behind.clear()
        for link in self.links.values():
            link.close()
        for seg in self.slots.values():
            seg.close()
        if self.channel is not None:
            self.channel.close()


class Request:
    """One request as a handler sees it: the header, the arrays, and its :class:`Reply`."""

    def __init__(
        self, paths: Paths, identity: bytes, header: dict[str, Any], arrays: list[np.ndarray]
    ) -> None:
        self.paths = paths
        self.identity = identity
        self.header = header
        self.arrays = arrays
        self.raw = False  # arrays[0] is a bulk payload: raw bytes
        self.reply = Reply(paths, identity, header)

    def keyed_arrays(self, where: str) -> list[np.ndarray]:
        """The arrays of a request to a sparse table (the bulk channel is for dense ones)."""
        if self.raw:
            raise Refusal("invalid", f"{where}: the bulk channel is for dense tables")
        return self.arrays

    def dense_array(self, where: str, dtype: np.dtype[Any]) -> np.ndarray:
        """The one array of a push to a dense table, wherever it lies: frames, the bulk
        channel, the worker's shared segment. Its shape and dtype are the caller's to check."""
        h = self.header
        if h.get("shm"):
            if self.arrays:
                raise Refusal("invalid", f"{where}: a shared-memory push carries no arrays")
            return self.paths.shared(h["table"], h["rank"]).grad
        if len(self.arrays) != 1:
            raise Refusal("invalid", f"{where}: needs exactly one gradient array")
        if self.raw and self.arrays[0].nbytes % dtype.itemsize == 0:
            return self.arrays[0].view(dtype)  # raw bytes from the bulk channel
        return self.arrays[0]

    @property
    def prechecked(self) -> bool:
        """Whether the worker found every value finite and a scan here would buy nothing: a
        gradient in shared memory (a dense table's segment, or the request's slot: a sparse
        push's summed rows), which the worker could change after any scan of ours (a second
        pass costs 2 ms of 64 MiB, 0.7 ms of a Zipf step's 29,000 rows x 64). Every gradient
        that crosses the socket is checked."""
        h = self.header
        if not h.get("checked"):
            return False
        if h.get("shm"):
            return True
        region = self.paths.slot_region(h)
        if region is None or not self.arrays:
            return False
        grad = self.arrays[-1]
        start = int(grad.ctypes.data) - int(region.ctypes.data)
        return start >= 0 and start + grad.nbytes <= region.nbytes


class Reply:
    """Where the answer to one request goes; its arrays go back the way the request came."""

    def __init__(self, paths: Paths, identity: bytes, header: dict[str, Any]) -> None:
        self.paths = paths
        self.identity = identity
        self.header = header

    def ok(self, **fields: Any) -> None:
        """A reply without arrays."""
        self.paths.router.reply(self.identity, self.header["id"], **fields)

    def error(self, code: str, message: str) -> None:
        self.paths.router.error(self.identity, self.header["id"], code, message)

    def refuse(self, exc: Refusal | ConfigError) -> None:
        """The error reply for a refusal, or for a bad argument (code ``invalid``)."""
        self.error(exc.code if isinstance(exc, Refusal) else "invalid", str(exc))

    def rows_out(self, n: int, dim: int, dtype: np.dtype[Any]) -> np.ndarray | None:
        """Where ``n`` rows of the reply may be written in place (no copy), or None."""
        region = self.paths.slot_region(self.header)
        if region is None:
            return None
        at = protocol.slot_align(int(self.header.get("reply_at", 0)))
        nbytes = n * dim * dtype.itemsize
        if at + nbytes > region.nbytes:
            return None
        return region[at : at + nbytes].view(dtype).reshape(n, dim)

    def send(self, arrays: Sequence[np.ndarray], **fields: Any) -> None:
        """A reply with ``arrays`` (rows written by :meth:`rows_out` stay where they are)."""
        region = self.paths.slot_region(self.header)
        at = int(self.header.get("reply_at", 0)) if region is not None else 0
        self.paths.router.reply(
            self.identity, self.header["id"], arrays, region=region, start=at, **fields
        )

    def dense(self, values: DenseValues, version: int, *, raw: bool, **fields: Any) -> None:
        """Answer a pull of a dense range with its values at ``version`` (which changes
        whenever they do); ``raw``: the values may travel as they are (no value codec)."""
        h = self.header
        if h.get("shm"):
            shared = self.paths.shared(h["table"], h["rank"])
            r = shared.region(h, f"pull of table {h['table']!r}")
            if shared.versions[r] != version:  # else the worker's region is current
                values.pull(out=shared.replies[r])
                shared.versions[r] = version
            self.ok(shm=True, **fields)
            return
        link = self.paths.link(h["table"])
        channel = self.paths.channel
        if h.get("bulk") and channel is not None and raw:
            data = values.weights.data.cast("B")
            # written straight from the weights, as the socket takes it (see Paths.changing)
            if channel.send(self.identity, data, owner=link):
                self.ok(bulk=data.nbytes, **fields)
                return
        # into a reused reply buffer once libzmq has finished sending its last contents
        # (a fresh 64 MiB array per pull costs as much in page faults as the transfer)
        buf, w = link.buf, values.weights
        # (a new buffer too when the range changed: a move re-cut the table)
        if buf is None or buf.shape != w.shape or not (link.tracker is None or link.tracker.done):
            buf = np.empty(w.shape, w.dtype)
        rows = values.pull(out=buf)
        link.tracker = self.paths.router.reply(self.identity, h["id"], [rows], track=True, **fields)
        link.buf = buf

    def mirror(self) -> np.ndarray | None:
        """The worker's own copy of a dense range, when it reads the values in shared memory
        (the reply region a push names): an update may write the new values there in the same
        pass (then call :meth:`mirrored`). None otherwise."""
        h = self.header
        if not h.get("shm") or "region" not in h:  # (every region held by the worker)
            return None
        shared = self.paths.shared(h["table"], h["rank"])
        return shared.replies[shared.region(h, f"push to table {h['table']!r}")]

    def mirrored(self, version: int) -> None:
        """The worker's copy (:meth:`mirror`) now holds the values at ``version``."""
        h = self.header
        shared = self.paths.shared(h["table"], h["rank"])
        shared.versions[shared.region(h, "")] = version
