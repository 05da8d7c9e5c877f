"""One server process: registration, the single-threaded event loop, and request handlers.

The loop owns every shard (no locks around tables): it receives requests on its data ROUTER and
cluster views on its DEALER to the coordinator, answers pulls (or defers them until the table's
consistency allows), applies pushes with the table's optimizer, and keeps per-worker clocks.
Heartbeats run on their own thread and socket. A bad request gets an error reply and changes
nothing; the server never dies of one.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import socket as pysocket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from paramserver import checkpoint
from paramserver.arrays import all_finite, check_keys
from paramserver.config import Timeouts
from paramserver.errors import ConfigError, ProtocolError, PSError, RemoteError
from paramserver.init import Zeros
from paramserver.metrics import ServerMetrics
from paramserver.optim import SGD
from paramserver.partition import HashRing
from paramserver.server.consistency import (
    Clocks,
    SyncBuffer,
    aggregate_dense,
    aggregate_sparse,
    pull_ready,
    staleness_of,
)
from paramserver.server.shard import DenseShard, SparseShard
from paramserver.spec import TableSpec
from paramserver.wire import bulk, protocol, shm
from paramserver.wire.transport import (
    Endpoint,
    Heartbeat,
    Router,
    Security,
    new_context,
)

__all__ = ["Server", "run_server"]

log = logging.getLogger(__name__)


class Refused(PSError):
    """A request this server will not carry out; becomes an error reply with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Table:
    spec: TableSpec
    shard: SparseShard | DenseShard | None  # None: a dense table with no range on this server
    start: int = 0
    stop: int = 0
    sync: SyncBuffer | None = None
    pulls: int = 0
    pushes: int = 0
    skipped: int = 0  # gradient rows (sparse) or gradients (dense) skipped as non-finite
    # dense, same host: worker rank -> its shared-memory segment, and the table version its
    # reply region holds (``version`` counts the updates applied here)
    segments: dict[int, shm.Segment] = field(default_factory=dict)
    reply_version: dict[int, int] = field(default_factory=dict)
    version: int = 0
    reply_buf: tuple[np.ndarray | None, Any] = (None, None)
    # sparse key caching: (worker rank, signature) -> (row ids, whether any repeat), LRU
    key_cache: OrderedDict[tuple[int, int], tuple[np.ndarray, bool]] = field(
        default_factory=OrderedDict
    )


KEY_CACHE_ENTRIES = 32  # per table; a worker keeps fewer, so its live signatures stay here


@dataclass
class DeferredPull:
    identity: bytes
    header: dict[str, Any]
    keys: np.ndarray | None
    deadline: float
    since: float = field(default_factory=time.monotonic)


class Server:
    """A server: bind, register with the coordinator, serve until told to stop.

    Example:
        srv = Server("tcp://127.0.0.1:7000")
        srv.serve()          # blocks; srv.stop() from another thread or SIGTERM ends it
    """

    def __init__(
        self,
        coordinator: str,
        host: str = "127.0.0.1",
        port: int = 0,
        timeouts: Timeouts | None = None,
        advertise: str | None = None,
        rank: int | None = None,
        security: Security | None = None,
    ) -> None:
        self.wanted_rank = rank
        self.security = security
        self.timeouts = timeouts or Timeouts()
        self.coordinator = coordinator
        self.ctx = new_context()
        try:
            self.router = Router(self.ctx, host, port, security)
        except BaseException:  # e.g. the address is in use: leave no context behind
            self.ctx.term()
            raise
        self.address = self.router.address
        # the bulk channel for large dense payloads; sealed with a token, if it can be
        self.bulk: bulk.Listener | None = None
        if security is None or bulk.can_seal():
            try:
                secret = None if security is None else security.server_secret
                self.bulk = bulk.Listener(host, idle=self.timeouts.heartbeat_timeout, secret=secret)
            except OSError as exc:
                log.warning("no bulk channel (dense values travel in ZeroMQ frames): %s", exc)
        self._watched: dict[int, int] = {}  # bulk fds in the poller -> events
        if advertise or host in ("0.0.0.0", "*"):
            self.address = f"tcp://{advertise or pysocket.gethostname()}:{self.router.port}"
        self.tables: dict[str, Table] = {}
        self.deferred: list[DeferredPull] = []
        self.last_seq: dict[int, int] = {}
        self.rank = -1
        self.name = "server[?]"
        self.epoch = 0
        self.clocks = Clocks(0)
        self._stop = threading.Event()
        self._coord = Endpoint(
            self.ctx,
            request_timeout=self.timeouts.connect,
            on_message=self._on_coordinator_message,
            security=security,
        )
        self._coord.connect("coordinator", coordinator)
        self._heartbeat: Heartbeat | None = None
        self._rejections = protocol.Rejections()
        self._snapshot: tuple[int, str, int] | None = None  # (request id, directory, clock)
        # reused receive buffers for arrays that arrive in several frames (no page faults per
        # message); an array decoded into one is only valid while its request is handled
        self._scratch: list[np.ndarray] = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
        # same host: (worker rank, slot) -> a shared-memory slot the worker's requests and
        # their replies put their arrays in (see protocol)
        self.slots: dict[tuple[int, int], shm.Segment] = {}
        self.metrics = ServerMetrics()  # latency and staleness, sent with stats
        self._received = 0  # bytes received since the allocator was last trimmed

    def _alloc(self, i: int, nbytes: int) -> np.ndarray:
        if i >= len(self._scratch):
            return np.empty(nbytes, np.uint8)
        if self._scratch[i].nbytes < nbytes:
            self._scratch[i] = np.empty(nbytes, np.uint8)
        return self._scratch[i]

    # ---- life -----------------------------------------------------------------------------

    def register(self) -> None:
        """Register with the coordinator and learn this server's rank and the view."""
        deadline = time.monotonic() + self.timeouts.connect
        while True:
            fut = self._coord.request(
                "coordinator",
                {
                    "kind": "register",
                    "role": "server",
                    "address": self.address,
                    "host": pysocket.gethostname()[:256],
                    "pid": os.getpid(),
                    "rank": self.wanted_rank,
                },
                what=f"server at {self.address} registering with the coordinator at "
                f"{self.coordinator}",
            )
            try:
                reply = fut.result(max(0.1, deadline - time.monotonic()))
                break
            except RemoteError as exc:
                # a restart of a server the coordinator has not yet declared dead: its rank
                # frees up within the heartbeat timeout
                if exc.code != "taken" or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.rank = int(reply["rank"])
        self.name = f"server[{self.rank}]"
        if self.bulk is not None:
            self.bulk.name = self.name
        view = reply["view"]
        restore = view.get("restore")
        start = int(restore["clock"]) if isinstance(restore, dict) else 0
        self.clocks = Clocks(int(view["num_workers"]), start=start)
        self._apply_view(view)
        # Beat before loading a checkpoint, which can take longer than the heartbeat timeout.
        self._heartbeat = Heartbeat(
            self.ctx,
            self.coordinator,
            "server",
            self.rank,
            int(view["token"]),
            self.timeouts.heartbeat_interval,
            status=lambda: {"clock": self.clocks.min_clock},
            security=self.security,
        )
        self._heartbeat.start()
        if isinstance(restore, dict):
            self._restore(str(restore["path"]), view, reply.get("tables") or [])
        else:  # a replacement with no checkpoint to load: the tables, empty
            for wire in reply.get("tables") or []:
                spec = TableSpec.from_wire(wire)
                self.tables[spec.name] = self._make_table(spec)
        log.info("%s serving at %s", self.name, self.address)

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Register (if not yet) and run the loop until stopped."""
        try:
            if self.rank < 0:
                self.register()
            poller = zmq.Poller()
            poller.register(self.router.socket, zmq.POLLIN)
            while not self._stop.is_set():
                wait_ms = 100
                if self.deferred:
                    soonest = min(d.deadline for d in self.deferred) - time.monotonic()
                    wait_ms = max(0, min(wait_ms, int(soonest * 1000) + 1))
                events = poller.poll(wait_ms) if self.bulk is None else self._poll(poller, wait_ms)
                if events:
                    for _ in range(256):
                        try:
                            identity, frames = self.router.recv_raw_nowait()
                        except BlockingIOError:
                            break
                        self._received += sum(memoryview(f).nbytes for f in frames)
                        self._handle(identity, frames)
                elif self._received >= TRIM_AFTER_BYTES:
                    # idle for a whole poll after large messages: hand the allocator's free
                    # memory back (freed message buffers, grown and replaced arrays) and the
                    # receive buffers too (12 MiB after pushes of 200k x 16 float32); the next
                    # burst allocates them once again
                    self._received = 0
                    self._scratch = [np.empty(0, np.uint8) for _ in self._scratch]
                    _libc_call("malloc_trim", 0)
                    for seg in self.slots.values():  # mapped again on the next request
                        seg.drop_pages()
                self._coord.poll(0)
                if self.deferred:
                    self._expire_deferred(time.monotonic())
                if self.bulk is not None:
                    self.bulk.expire(time.monotonic())
        finally:
            self.close()

    def _poll(self, poller: zmq.Poller, wait_ms: int) -> list[Any]:
        """Poll the ROUTER and the bulk channel's sockets; handle the bulk events here."""
        assert self.bulk is not None
        reading, writing = self.bulk.fds()
        want: dict[int, int] = dict.fromkeys(reading, int(zmq.POLLIN))
        for fd in writing:
            want[fd] = want.get(fd, 0) | int(zmq.POLLOUT)
        for fd in self._watched.keys() - want.keys():
            poller.unregister(fd)
        for fd, ev in want.items():
            if self._watched.get(fd) != ev:
                poller.register(fd, ev)
        self._watched = want
        events = poller.poll(wait_ms)
        for sock, ev in events:
            if isinstance(sock, int):
                err = bool(ev & zmq.POLLERR)
                self.bulk.handle(sock, err or bool(ev & zmq.POLLIN), err or bool(ev & zmq.POLLOUT))
        return events

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat.join(timeout=2)
        for t in self.tables.values():
            for seg in t.segments.values():
                seg.close()
        for seg in self.slots.values():
            seg.close()
        if self.bulk is not None:
            self.bulk.close()
        self._coord.close()
        self.router.close()
        self.ctx.term()
        log.info("%s stopped", self.name)

    # ---- cluster view ---------------------------------------------------------------------

    def _on_coordinator_message(
        self, peer: str, header: dict[str, Any], arrays: list[np.ndarray]
    ) -> None:
        if header["kind"] == "view":
            self._apply_view(header["view"])
        elif header["kind"] == "checkpoint":
            if self.clocks.min_clock > header["clock"]:
                # already past the boundary: a snapshot now would not be at that clock, and the
                # other servers' would be (the coordinator tries again further ahead)
                self._coord.send(
                    "coordinator",
                    protocol.error_header(
                        header["id"], "too_late",
                        f"{self.name} is already at clock {self.clocks.min_clock}",
                    ),
                )  # fmt: skip
                return
            self._snapshot = (header["id"], header["path"], header["clock"])
            self._progress()
        elif header["kind"] == "stop":
            log.info("%s: stop requested by the coordinator", self.name)
            self._stop.set()

    def _apply_view(self, view: dict[str, Any]) -> None:
        epoch = view.get("epoch")
        workers = view.get("workers")
        if not isinstance(epoch, int) or not isinstance(workers, list) or epoch <= self.epoch:
            return
        self.epoch = epoch
        live = {int(r) for r, state in workers if state in ("pending", "alive")}
        rejoined = {int(r): int(c) for r, c in view.get("rejoined") or []}
        for r in live - self.clocks.live:
            if r in rejoined and r < len(self.clocks.clock):
                # a restarted worker: it goes on at the clock the coordinator gave it
                self.clocks.clock[r] = rejoined[r]
                self.last_seq.pop(r, None)
        for key in [key for key in self.slots if key[0] not in live]:
            self.slots.pop(key).close()  # a worker that left or died: its slots go too
        if self.bulk is not None:
            for r in self.clocks.live - live:
                self.bulk.drop_rank(r)
        if live != self.clocks.live:
            self.clocks.set_live(live)
            self._progress()

    # ---- dispatch -------------------------------------------------------------------------

    def _handle(self, identity: bytes, frames: list[Any]) -> None:
        try:
            header, arrays = protocol.decode(frames, self._alloc, self._slot_region)
        except ProtocolError as exc:
            if self._rejections.count():
                log.warning(
                    "%s: malformed message dropped (%d so far): %s",
                    self.name,
                    self._rejections.total,
                    exc,
                )
            self.router.error(identity, exc.request_id, exc.code, f"{self.name}: {exc}")
            return
        kind, rid = header["kind"], header["id"]
        if "slot" in header:  # bytes that came in a shared slot count as received too
            self._received += sum(a.nbytes for a in arrays)
        handler = getattr(self, f"_on_{kind}", None)
        try:
            if kind == "push" and "bulk" in header:
                # first of all: the payload is on its way behind this header
                arrays = [self._recv_bulk(identity, header)]
            if handler is None:
                raise Refused("bad_request", f"a server does not take {kind!r} messages")
            started = time.perf_counter()
            handler(identity, header, arrays)
            self.metrics.observe_request(kind, time.perf_counter() - started)
        except Refused as exc:
            self.router.error(identity, rid, exc.code, str(exc))
        except ConfigError as exc:
            self.router.error(identity, rid, "invalid", str(exc))
        except Exception as exc:  # a bug must not take the server down with it
            log.exception("%s: %s request %d failed", self.name, kind, rid)
            self.router.error(identity, rid, "internal", f"{type(exc).__name__}: {exc}")

    def _recv_bulk(self, identity: bytes, h: dict[str, Any]) -> np.ndarray:
        what = f"{self.name}: push to table {h['table']!r} from worker[{h['rank']}]"
        buf = self._alloc(0, h["bulk"])[: h["bulk"]]
        try:
            if self.bulk is None:
                raise ConnectionError(f"{what}: {self.name} has no bulk channel")
            self.bulk.recv(identity, buf.data, what)
        except OSError as exc:
            raise Refused("bulk", f"{exc}; the table is unchanged") from None
        return buf

    def _changing(self, t: Table) -> None:
        """Called before a dense shard's weights change: replies still being written from
        them keep the values they were sent with."""
        if self.bulk is not None:
            self.bulk.release(t)

    def _table(self, name: str) -> Table:
        t = self.tables.get(name)
        if t is None:
            raise Refused("unknown_table", f"table {name!r} does not exist on {self.name}")
        return t

    def _check_live(self, rank: int) -> None:
        if rank not in self.clocks.live:
            # a restarted worker may be faster than the view that lets it back in: wait for it
            deadline = time.monotonic() + 1.0
            while rank not in self.clocks.live and (left := deadline - time.monotonic()) > 0:
                self._coord.poll(left)
        if rank not in self.clocks.live:
            raise Refused("not_live", f"worker[{rank}] is not a live member in view {self.epoch}")

    # ---- handlers -------------------------------------------------------------------------

    def _on_ping(self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.router.reply(identity, h["id"])

    def _on_create_shard(
        self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]
    ) -> None:
        spec = TableSpec.from_wire(h["spec"])
        old = self.tables.get(spec.name)
        if old is not None:
            diff = old.spec.conflicts(spec)
            if diff or old.spec.ranges != spec.ranges:
                raise Refused(
                    "conflict",
                    f"table {spec.name!r} exists on {self.name} with a "
                    f"different {', '.join(diff) or 'placement'}",
                )
            self.router.reply(identity, h["id"])
            return
        self.tables[spec.name] = self._make_table(spec)
        log.info("%s: table %r created", self.name, spec.name)
        self.router.reply(identity, h["id"])

    def _make_table(self, spec: TableSpec) -> Table:
        assert spec.seed is not None
        mode, _ = spec.mode
        table: Table
        if spec.kind == "sparse":
            table = Table(
                spec, SparseShard(spec.dim, spec.np_dtype, spec.init, spec.optimizer, spec.seed)
            )
        else:
            mine = [(s, a, b) for s, a, b in spec.ranges if s == self.rank]
            if mine:
                _, a, b = mine[0]
                table = Table(
                    spec,
                    DenseShard(
                        b - a, spec.np_dtype, spec.init, spec.optimizer, spec.seed, offset=a
                    ),
                    a,
                    b,
                )
            else:
                table = Table(spec, None)
        if mode == "sync":
            table.sync = SyncBuffer(spec.kind)
        return table

    def _on_set_lr(self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        t = self._table(h["table"])
        opt = t.spec.optimizer.with_lr(float(h["lr"]))
        if t.shard is not None:
            t.shard.set_optimizer(opt)
        t.spec = replace(t.spec, optimizer=opt)
        self.router.reply(identity, h["id"])

    def _on_stats(self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        stats = {
            name: {
                "kind": t.spec.kind,
                "rows": int(t.shard.num_rows) if t.shard is not None else 0,
                "bytes": int(t.shard.nbytes) if t.shard is not None else 0,
                "pulls": t.pulls,
                "pushes": t.pushes,
                "skipped_nonfinite": t.skipped,
            }
            for name, t in self.tables.items()
        }
        self.router.reply(
            identity,
            h["id"],
            stats={
                "rank": self.rank,
                "pid": os.getpid(),
                "address": self.address,
                "tables": stats,
                "clocks": list(self.clocks.clock),
                "deferred": len(self.deferred),
                "metrics": self.metrics.to_wire(),
            },
        )

    def _on_clock(self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        rank = h["rank"]
        if rank >= len(self.clocks.clock):
            raise Refused("invalid", f"worker rank {rank} out of range")
        self.clocks.advance(rank, h["clock"])
        self._progress()
        self.router.reply(identity, h["id"])

    def _caught_up(self, rank: int, clock: int) -> None:
        """A request at ``clock`` means its worker has finished every clock before it; a server
        that restarted after the worker's clock messages learns it this way."""
        if clock > self.clocks.clock[rank]:
            self.clocks.advance(rank, clock)
            self._progress()

    def _on_pull(self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        t = self._table(h["table"])
        if h["rank"] >= len(self.clocks.clock):
            raise Refused("invalid", f"worker rank {h['rank']} out of range")
        self._caught_up(h["rank"], h["clock"])
        if "sig" in h:
            self._cached_rows(t, h, arrays, "pull")
            keys = None
        else:
            keys = self._pull_keys(t, arrays)
        mode, bound = t.spec.mode
        if pull_ready(mode, bound, h["clock"], self.clocks.min_clock):
            self._answer_pull(identity, h, t, keys)
        else:
            # answer just before the worker gives up, with a reason that names who is slow
            wait = max(0.0, h["timeout"] * 0.95 - 0.05)
            kept = None if keys is None else keys.copy()  # keys may live in a reused buffer
            self.deferred.append(DeferredPull(identity, h, kept, time.monotonic() + wait))

    def _pull_keys(self, t: Table, arrays: list[np.ndarray]) -> np.ndarray | None:
        if t.spec.kind == "dense":
            if arrays:
                raise Refused("invalid", f"pull of dense table {t.spec.name!r} takes no key array")
            if t.shard is None:
                raise Refused(
                    "invalid", f"{self.name} holds no range of dense table {t.spec.name!r}"
                )
            return None
        if len(arrays) != 1:
            raise Refused(
                "invalid", f"pull of sparse table {t.spec.name!r} needs exactly one key array"
            )
        return check_keys(arrays[0], f"pull of {t.spec.name!r}")

    def _answer_pull(
        self, identity: bytes, h: dict[str, Any], t: Table, keys: np.ndarray | None
    ) -> None:
        assert t.shard is not None
        staleness = staleness_of(h["clock"], self.clocks.min_clock)
        self.metrics.observe_staleness(t.spec.name, staleness)
        if isinstance(t.shard, SparseShard) and "sig" in h:
            ids, _ = self._cached_rows(t, h, [], "pull")
            rows = t.shard.pull_rows(ids, out=self._reply_rows(h, len(ids), t))
        elif isinstance(t.shard, SparseShard):
            assert keys is not None
            if h["create"]:
                self._check_room(t, keys)
            into = self._reply_rows(h, len(keys), t)
            rows = t.shard.pull(keys, create=h["create"], out=into)
        elif h.get("shm"):
            rank = h["rank"]
            reply = self._reply_region(t, rank)
            if t.reply_version.get(rank) != t.version:  # else the worker's buffer is current
                t.shard.pull(out=reply)
                t.reply_version[rank] = t.version
            t.pulls += 1
            self.router.reply(identity, h["id"], staleness=staleness, shm=True)
            return
        elif (
            h.get("bulk")
            and self.bulk is not None
            and t.spec.codec == "none"
            and self.bulk.send(identity, t.shard.weights.data.cast("B"), owner=t)
        ):
            # written straight from the weights, as the socket takes it (see _changing)
            t.pulls += 1
            nbytes = (t.stop - t.start) * t.spec.np_dtype.itemsize
            self.router.reply(identity, h["id"], staleness=staleness, bulk=nbytes)
            return
        else:
            # into a reused reply buffer once libzmq has finished sending its last contents
            # (a fresh 64 MiB array per pull costs as much in page faults as the transfer)
            buf, tracker = t.reply_buf
            if buf is None or not (tracker is None or tracker.done):
                buf = np.empty(t.stop - t.start, t.spec.np_dtype)
            rows = t.shard.pull(out=buf)
            t.pulls += 1
            tracker = self.router.reply(identity, h["id"], [rows], track=True, staleness=staleness)
            t.reply_buf = (buf, tracker)
            return
        t.pulls += 1
        codec = t.spec.codec
        if codec == "none":
            out = [rows]
        else:  # compiled encoders, loaded only by a server that has a codec table
            from paramserver.server.codec_kernels import encode_rows_fast

            out = encode_rows_fast(rows, codec)
        region = self._slot_region(h)
        at = int(h.get("reply_at", 0)) if region is not None else 0
        self.router.reply(identity, h["id"], out, region=region, start=at, staleness=staleness)

    def _cached_rows(
        self, t: Table, h: dict[str, Any], arrays: list[np.ndarray], what: str
    ) -> tuple[np.ndarray, bool]:
        """Row ids for a request with a key-list signature: resolved from the keys the first
        time (which must be there), looked up later."""
        if not isinstance(t.shard, SparseShard):
            raise Refused("invalid", f"key signatures are for sparse tables, not {t.spec.name!r}")
        if what == "pull" and not h["create"]:
            raise Refused("invalid", "a pull with a key signature must create rows")
        slot = (h["rank"], h["sig"])
        want = 1 if what == "pull" else 2  # pull: [keys]; push: [keys, grads]
        if len(arrays) == want:
            keys = check_keys(arrays[0], f"{what} of {t.spec.name!r}")
            if what == "push":
                self._check_sparse_grads(t, h, len(keys), arrays[1], finite=False)
            self._check_room(t, keys)
            entry = t.shard.resolve(keys)
            t.key_cache[slot] = entry
            while len(t.key_cache) > KEY_CACHE_ENTRIES:
                t.key_cache.popitem(last=False)
            return entry
        if len(arrays) != want - 1:
            raise Refused("invalid", f"{what} of {t.spec.name!r}: wrong number of arrays")
        found = t.key_cache.get(slot)
        if found is None:
            raise Refused(
                "unknown_sig",
                f"{self.name} does not know key list {h['sig']} of worker[{h['rank']}] for "
                f"table {t.spec.name!r}; send the keys again",
            )
        t.key_cache.move_to_end(slot)
        return found

    def _check_sparse_grads(
        self, t: Table, h: dict[str, Any], n: int, grads: np.ndarray, *, finite: bool = True
    ) -> np.ndarray | None:
        """Check shape and dtype; returns None if every value is finite, else (policy "skip")
        the mask of the rows to keep."""
        where = f"push to table {t.spec.name!r} from worker[{h['rank']}]"
        want = (n, t.spec.dim)
        if grads.shape != want or grads.dtype != t.spec.np_dtype:
            raise Refused(
                "invalid",
                f"{where}: gradient must be {want} {t.spec.np_dtype}, "
                f"got {tuple(grads.shape)} {grads.dtype}",
            )
        return self._finite_rows(t, where, grads) if finite else None

    def _finite_rows(self, t: Table, where: str, grads: np.ndarray) -> np.ndarray | None:
        if all_finite(grads):
            return None
        if t.spec.nonfinite == "reject":
            raise Refused(
                "non_finite",
                f"{where} rejected: the gradient contains NaN or Inf; the table is unchanged",
            )
        keep: np.ndarray = np.isfinite(grads).reshape(len(grads), -1).all(axis=1)
        t.skipped += int(len(keep) - keep.sum())
        return keep

    def _check_room(self, t: Table, keys: np.ndarray) -> None:
        """Refuse (changing nothing) a request that would grow a sparse table past max_rows."""
        cap = t.spec.max_rows
        if cap is None or not isinstance(t.shard, SparseShard):
            return
        have = t.shard.num_rows
        if have + len(keys) <= cap:
            return  # cheap: even if every key were new
        new = int(len(keys) - np.count_nonzero(t.shard.contains(np.unique(keys))))
        if have + new > cap:
            raise Refused(
                "full",
                f"table {t.spec.name!r} is full on {self.name}: it holds {have} rows and "
                f"max_rows is {cap}; a request for {new} new keys was refused and nothing "
                "changed (raise max_rows, add servers, or evict rows)",
            )

    def _segment(self, t: Table, rank: int) -> shm.Segment:
        seg = t.segments.get(rank)
        if seg is None:
            raise Refused(
                "invalid",
                f"worker[{rank}] has no shared-memory segment attached for table "
                f"{t.spec.name!r} on {self.name}",
            )
        return seg

    def _reply_region(self, t: Table, rank: int) -> np.ndarray:
        seg = self._segment(t, rank)
        dt = t.spec.np_dtype
        return seg.reply.view(dt)[t.start : t.stop]

    def _on_open_bulk(self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        if self.bulk is None:
            why = "it could not bind"
            if self.security is not None and not bulk.can_seal():
                why = "a cluster token is set and the cryptography package is missing"
            raise Refused("no_bulk", f"{self.name} has no bulk channel: {why}")
        port, ticket = self.bulk.port, self.bulk.ticket(identity, h["rank"])
        self.router.reply(identity, h["id"], port=port, ticket=ticket)

    def _on_attach(self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        t = self._table(h["table"])
        rank = h["rank"]
        if t.spec.kind != "dense" or t.shard is None:
            raise Refused(
                "invalid", f"{self.name} holds no range of dense table {t.spec.name!r} to share"
            )
        if arrays:
            raise Refused("invalid", "attach takes no arrays")
        nbytes = t.spec.size * t.spec.np_dtype.itemsize
        try:
            seg = shm.attach(h["path"], h["nonce"], nbytes)
        except OSError as exc:
            raise Refused("no_shm", f"{self.name} cannot map {h['path']!r}: {exc}") from None
        old = t.segments.pop(rank, None)
        if old is not None:
            old.close()
        t.segments[rank] = seg
        t.reply_version.pop(rank, None)
        self.router.reply(identity, h["id"])

    def _on_attach_slot(self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        if arrays:
            raise Refused("invalid", "attach_slot takes no arrays")
        self._check_live(h["rank"])
        try:
            seg = shm.attach(h["path"], h["nonce"], h["size"], regions=1)
        except OSError as exc:
            raise Refused("no_shm", f"{self.name} cannot map {h['path']!r}: {exc}") from None
        old = self.slots.pop((h["rank"], h["slot"]), None)
        if old is not None:
            old.close()
        self.slots[h["rank"], h["slot"]] = seg
        self.router.reply(identity, h["id"])

    def _slot_region(self, h: dict[str, Any]) -> np.ndarray | None:
        """The shared slot a request names (None: it names none, or one not attached)."""
        slot = h.get("slot")
        seg = None if slot is None else self.slots.get((int(h.get("rank", -1)), slot))
        return None if seg is None else seg.regions[0]

    def _reply_rows(self, h: dict[str, Any], n: int, t: Table) -> np.ndarray | None:
        """Where a pull's rows can be written straight into the request's slot (no copy)."""
        region = self._slot_region(h)
        if region is None or t.spec.codec != "none":
            return None
        at = protocol.slot_align(int(h.get("reply_at", 0)))
        dt = t.spec.np_dtype
        nbytes = n * t.spec.dim * dt.itemsize
        if at + nbytes > region.nbytes:
            return None
        return region[at : at + nbytes].view(dt).reshape(n, t.spec.dim)

    def _on_push(self, identity: bytes, h: dict[str, Any], arrays: list[np.ndarray]) -> None:
        t = self._table(h["table"])
        rank, seq = h["rank"], h["seq"]
        self._check_live(rank)
        self._caught_up(rank, h["clock"])
        where = f"push to table {t.spec.name!r} from worker[{rank}]"
        dtype = t.spec.np_dtype
        if t.shard is None:
            raise Refused("invalid", f"{self.name} holds no range of dense table {t.spec.name!r}")
        if "bulk" in h and t.spec.kind != "dense":
            raise Refused("invalid", f"{where}: the bulk channel is for dense tables")
        if "sig" in h:
            if t.sync is not None:
                raise Refused("invalid", f"{where}: key signatures are for async/ssp tables")
            ids, dup = self._cached_rows(t, h, arrays, "push")
            grads = arrays[-1]
            keep = self._check_sparse_grads(t, h, len(ids), grads)
            if keep is not None:
                ids, grads = ids[keep], grads[keep]
            if seq <= self.last_seq.get(rank, -1):
                self.router.reply(identity, h["id"])  # a retry of a push already applied
                return
            self.last_seq[rank] = seq
            t.pushes += 1
            assert isinstance(t.shard, SparseShard)
            t.shard.push_rows(ids, grads, dup)
            self.router.reply(identity, h["id"])
            return
        if isinstance(t.shard, SparseShard):
            if len(arrays) != 2:
                raise Refused("invalid", f"{where}: needs a key array and a gradient array")
            keys, grads = arrays
            check_keys(keys, where)
            want: tuple[int, ...] = (len(keys), t.spec.dim)
        elif h.get("shm"):
            if arrays:
                raise Refused("invalid", f"{where}: a shared-memory push carries no arrays")
            keys = None
            grads = self._segment(t, rank).grad.view(dtype)[t.start : t.stop]
            want = (t.stop - t.start,)
        else:
            if len(arrays) != 1:
                raise Refused("invalid", f"{where}: needs exactly one gradient array")
            keys, grads = None, arrays[0]
            if "bulk" in h and grads.nbytes % dtype.itemsize == 0:
                grads = grads.view(dtype)  # raw bytes from the bulk channel
            want = (t.stop - t.start,)
        if grads.shape != want or grads.dtype != dtype:
            raise Refused(
                "invalid",
                f"{where}: gradient must be {want} {dtype}, got {tuple(grads.shape)} {grads.dtype}",
            )
        # A gradient in shared memory that the worker checked is not scanned again: the worker
        # could change it after any scan of ours, so a second pass (2 ms of 64 MiB) would buy
        # no safety; every gradient that crosses the socket is checked here.
        checked = bool(h.get("shm") and h.get("checked"))
        keep = None if checked else self._finite_rows(t, where, grads)
        if keep is not None:
            if keys is None:  # dense: the whole gradient is skipped
                self.router.reply(identity, h["id"])
                return
            keys, grads = keys[keep], grads[keep]
        if keys is not None:
            self._check_room(t, keys)
        if seq <= self.last_seq.get(rank, -1):
            self.router.reply(identity, h["id"])  # a retry of a push already applied
            return
        self.last_seq[rank] = seq
        t.pushes += 1
        if t.sync is not None:
            if h["clock"] < self.clocks.clock[rank]:
                raise Refused("invalid", f"{where}: clock {h['clock']} is already finished")
            # kept until the clock completes: copied out of reused or shared buffers
            grads = grads.copy()
            if keys is not None:
                keys = keys.copy()
            t.sync.add(h["clock"], (rank, keys, grads) if keys is not None else (rank, grads))
        elif isinstance(t.shard, SparseShard):
            assert keys is not None
            t.shard.push(keys, grads)
        elif h.get("shm"):
            # refresh the worker's reply region in the same pass: its next pull is free
            self._changing(t)
            t.shard.push(grads, out=self._reply_region(t, rank))
            t.version += 1
            t.reply_version[rank] = t.version
        else:
            self._changing(t)
            t.shard.push(grads)
            t.version += 1
        self.router.reply(identity, h["id"])

    # ---- consistency ----------------------------------------------------------------------

    def _progress(self) -> None:
        """Apply completed sync clocks (taking a pending checkpoint exactly at its clock
        boundary), then answer the deferred pulls that became ready."""
        low = self.clocks.min_clock
        if self._snapshot is not None and self._snapshot[2] <= low:
            self._apply_sync(self._snapshot[2])
            self._write_snapshot()
        self._apply_sync(low)
        if self.deferred:
            waiting, self.deferred = self.deferred, []
            for d in waiting:
                table = self.tables[d.header["table"]]  # tables are never dropped
                mode, bound = table.spec.mode
                if pull_ready(mode, bound, d.header["clock"], low):
                    self._answer_pull(d.identity, d.header, table, d.keys)
                else:
                    self.deferred.append(d)

    def _apply_sync(self, below: int) -> None:
        """Apply the buffered sync pushes of every clock < ``below``."""
        live = self.clocks.live
        for t in self.tables.values():
            if t.sync is None or t.shard is None:
                continue
            for _, items in t.sync.take_completed(below):
                items = [it for it in items if it[0] in live]
                if not items:
                    continue
                if isinstance(t.shard, SparseShard):
                    keys, mean = aggregate_sparse(items, len(live))
                    t.shard.push(keys, mean)
                else:
                    self._changing(t)
                    t.shard.push(aggregate_dense(items, len(live)))
                t.version += 1

    # ---- checkpoints ----------------------------------------------------------------------

    def _write_snapshot(self) -> None:
        assert self._snapshot is not None
        rid, path, clock = self._snapshot
        self._snapshot = None
        start = time.monotonic()
        try:
            index = checkpoint.write_server_shards(
                Path(path),
                self.rank,
                {n: (t.spec, t.shard, t.start, t.stop) for n, t in self.tables.items()},
            )
        except OSError as exc:
            log.error("%s: checkpoint at clock %d into %s failed: %s", self.name, clock, path, exc)
            self._coord.send("coordinator", protocol.error_header(rid, "io", f"{self.name}: {exc}"))
            return
        log.info(
            "%s: checkpoint at clock %d written to %s in %.2fs",
            self.name,
            clock,
            path,
            time.monotonic() - start,
        )
        rows = sum(int(e["count"]) for e in index["tables"].values())
        self._coord.send("coordinator", {"kind": "reply", "id": rid, "stats": {"rows": rows}})

    def _restore(self, path: str, view: dict[str, Any], tables: list[Any]) -> None:
        directory, manifest, _ = checkpoint.read_manifest(path)
        ring = HashRing.build(list(range(int(view["num_servers"]))))
        saved = {t["name"] for t in manifest["tables"]}
        for wire in tables:
            spec = TableSpec.from_wire(wire)
            table = self._make_table(spec)
            if spec.name not in saved:  # created after the checkpoint: starts empty
                pass
            elif isinstance(table.shard, SparseShard):
                keys, rows = checkpoint.load_sparse_rows(
                    directory, manifest, spec.name, ring, self.rank
                )
                if len(keys):
                    table.shard.load(keys, rows.astype(spec.np_dtype, copy=False))
            elif isinstance(table.shard, DenseShard):
                dense = checkpoint.load_dense_range(
                    directory, manifest, spec.name, table.start, table.stop
                )
                if dense is not None:
                    table.shard.load(dense.astype(spec.np_dtype, copy=False))
            self.tables[spec.name] = table
        log.info(
            "%s: restored %d tables from %s at clock %d",
            self.name,
            len(tables),
            directory,
            manifest["clock"],
        )

    def _expire_deferred(self, now: float) -> None:
        keep = []
        for d in self.deferred:
            if now < d.deadline:
                keep.append(d)
                continue
            slow = ", ".join(f"worker[{r}] at clock {c}" for r, c in self.clocks.slowest())
            table = self.tables.get(d.header["table"])
            mode = table.spec.consistency if table is not None else "?"
            self.router.error(
                d.identity,
                d.header["id"],
                "timeout",
                f"pull of table {d.header['table']!r} at clock {d.header['clock']} ({mode}) "
                f"waited {now - d.since:.1f}s on {self.name} for {slow or 'no one'}",
            )
        self.deferred = keep


TRIM_AFTER_BYTES = 32 << 20
_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def _libc_call(name: str, *args: int) -> None:
    fn = getattr(_libc(), name, None) if sys.platform.startswith("linux") else None
    if fn is not None:
        fn(*args)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): allocator tuning is skipped
        return None


def tune_allocator() -> None:
    """Limit glibc malloc to two arenas in this (server) process. Every thread that allocates
    (libzmq's I/O thread receives the messages) otherwise gets its own arena, and freed
    message buffers stay in each: 28 MiB of a server's RSS holding 1M rows with Adagrad.
    Call it before threads start.

    Example:
        tune_allocator()
    """
    _libc_call("mallopt", _M_ARENA_MAX, 2)


def warm_kernels() -> None:
    """Load the compiled kernels of a first pull and push from numba's cache. Meant for a
    background thread of a server process, started before it registers: the loads overlap the
    registration and the worker's table creation instead of delaying the first pull.

    numba's first kernel load checks for BLAS by importing ``scipy.linalg`` when SciPy is
    installed (0.3-0.7 s and ~15 MiB of a server's memory here); no kernel uses BLAS, so SciPy
    is hidden from that check. Only call this in a server process: the check's answer stays.

    Example:
        threading.Thread(target=warm_kernels, daemon=True).start()
    """
    hide = "scipy.linalg" not in sys.modules
    if hide:  # import scipy.linalg -> ImportError
        sys.modules["scipy.linalg"] = None  # type: ignore[assignment]
    try:
        shard = SparseShard(1, np.dtype(np.float32), Zeros(), SGD(), 0)
        keys = np.arange(2, dtype=np.uint64)
        shard.pull(keys)
        shard.push(keys, np.zeros((2, 1), np.float32))
    except Exception:  # only an optimization: the real request compiles what it needs
        log.debug("warming the kernels failed", exc_info=True)
    finally:
        if hide and "scipy.linalg" in sys.modules and sys.modules["scipy.linalg"] is None:
            del sys.modules["scipy.linalg"]


def run_server(
    coordinator: str, host: str = "127.0.0.1", port: int = 0, timeouts: Timeouts | None = None
) -> None:
    """Start a server and serve until stopped (SIGTERM/SIGINT handled by the caller)."""
    Server(coordinator, host, port, timeouts).serve()
