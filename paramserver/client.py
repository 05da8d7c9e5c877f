"""The worker's handle on a cluster: table handles, pull / push / clock, dedup, routing, futures.

A :class:`Client` registers with the coordinator as a worker, connects one DEALER to every
server and drives those sockets from the calling thread: every call returns (or is) a
:class:`~paramserver.transport.Future`, and requests to different servers are all sent before
any answer is awaited, so they proceed in parallel.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket as pysocket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from typing import Any, cast

import numpy as np

from paramserver import bulk, shm
from paramserver.codec import decode_rows
from paramserver.config import (
    Timeouts,
    from_env,
    normalize_address,
    parse_consistency,
    parse_transport,
)
from paramserver.errors import ConfigError, NodeLostError, PSTimeoutError, RemoteError
from paramserver.init import Initializer, Zeros
from paramserver.optim import SGD, Optimizer
from paramserver.parallel import halves
from paramserver.partition import HashRing, split_by_owner
from paramserver.protocol import SLOT_MIN_BYTES
from paramserver.slots import SlotPool, reply_offset
from paramserver.spec import TableSpec
from paramserver.transport import (
    Endpoint,
    Future,
    Heartbeat,
    Message,
    Security,
    gather,
    new_context,
)

__all__ = ["Client", "DenseTable", "SparseTable", "connect"]

log = logging.getLogger(__name__)


def connect(
    address: str | None = None,
    *,
    rank: int | None = None,
    timeouts: Timeouts | None = None,
    token: str | None = None,
    transport: str | None = None,
) -> Client:
    """Join a cluster as a worker.

    With no address, the coordinator comes from ``PS_COORDINATOR`` (and the rank from
    ``PS_RANK``), as set by ``paramserver run`` or any other launcher. The cluster token comes
    from ``token`` or ``PS_TOKEN`` / ``PS_TOKEN_FILE``. ``transport``
    (default ``PS_TRANSPORT``, else ``"auto"``): ``"auto"`` passes dense tables, and the large
    arrays of sparse requests, through shared memory with servers on this host and uses TCP for
    the rest; ``"tcp"`` always uses TCP. Over TCP, large dense arrays take a raw socket beside
    ZeroMQ (the bulk channel), except with a cluster token (it is not encrypted) or with
    ``"zmq"``: ZeroMQ frames only.

    Example:
        client = ps.connect("127.0.0.1:7000")
        client.rank   # 0..num_workers-1
    """
    env = from_env()
    if address is None:
        if env.coordinator is None:
            raise ConfigError("no coordinator address: pass one, or set PS_COORDINATOR=host:port")
        address = env.coordinator
    return Client(
        normalize_address(address),
        rank=env.rank if rank is None else rank,
        timeouts=timeouts or env.timeouts,
        token=token or env.token,
        transport=transport,
    )


def _server(rank: int) -> str:
    return f"server[{rank}]"


class _Endpoint(Endpoint):
    """The worker's endpoint: while requests wait for a lost server's replacement, every poll
    also gives up on those whose time is over (nothing else would wake them)."""

    expire: Callable[[], float | None] | None = None

    def poll(self, timeout: float) -> None:
        nxt = self.expire() if self.expire is not None else None
        if nxt is not None:
            timeout = min(timeout, max(0.0, nxt - time.monotonic()) + 0.001)
        super().poll(timeout)
        if self.expire is not None:
            self.expire()


class Client:
    """A worker's connection to the cluster. Use :func:`connect` or ``LocalCluster.connect()``.

    Example:
        with ps.connect() as client:
            emb = client.sparse_table("emb", dim=8)
            rows = emb.pull(np.array([1, 2, 3], dtype=np.uint64))
            client.clock()
    """

    def __init__(
        self,
        coordinator: str,
        *,
        rank: int | None = None,
        timeouts: Timeouts | None = None,
        token: str | None = None,
        transport: str | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.timeouts = timeouts or Timeouts()
        self._security = Security.from_token(token) if token is not None else None
        self.transport = from_env().transport if transport is None else parse_transport(transport)
        self._ctx = new_context()
        self._ep = _Endpoint(
            self._ctx, self.timeouts.request, on_message=self._on_message, security=self._security
        )
        self._ep.expire = self._expire_resends
        # server rank -> requests waiting for that server to come back: (deadline, lost peer,
        # resend, give up)
        # server rank -> how many times a new process took it over (shared memory is not shared
        # with a replacement: dense tables reach it over TCP)
        self.replaced: Counter[int] = Counter()
        self._resends: dict[
            int, list[tuple[float, object, Callable[[], None], Callable[[], None]]]
        ] = {}
        self._ep.connect("coordinator", coordinator)
        # server rank -> (its ``replaced`` count when made, shared-memory slots with it)
        self._slot_pools: dict[int, tuple[int, SlotPool]] = {}
        self._clock = 0
        self._examples = 0  # reported by report(); sent with heartbeats (paramserver status)
        # Sequence numbers start from the wall clock so a restarted worker never reuses one.
        self._seq = time.time_ns()
        self._clock_futures: list[Future[Any]] = []
        self._barriers: Counter[str] = Counter()
        self._tables: dict[str, SparseTable | DenseTable] = {}
        self._closed = False
        self._epoch = 0
        self.view: dict[str, Any] = {}
        self._heartbeat: Heartbeat | None = None
        try:
            self._register(rank)
        except BaseException:
            self._ep.close()
            self._ctx.term()
            raise

    # ---- membership -----------------------------------------------------------------------

    def _register(self, rank: int | None) -> None:
        what = f"worker registering with the coordinator at {self.coordinator}"
        fut = self._ep.request(
            "coordinator",
            {
                "kind": "register",
                "role": "worker",
                "rank": rank,
                "host": pysocket.gethostname()[:256],
                "pid": os.getpid(),
            },
            what=what,
        )
        # Asked at once and answered at once by a live coordinator, so that a registration that
        # times out can say why without waiting any longer.
        probe = self._ep.request("coordinator", {"kind": "get_view"}, what="get_view")
        try:
            reply = fut.result(self.timeouts.connect)
        except PSTimeoutError:
            raise PSTimeoutError(self._why_no_registration(what, probe)) from None
        view = reply["view"]
        self.rank: int = int(reply["rank"])
        self.num_workers: int = int(view["num_workers"])
        self.num_servers: int = int(view["num_servers"])
        self._clock = int(view.get("start_clock") or 0)
        self._apply_view(view)
        self.ring = HashRing.build(list(range(self.num_servers)))
        self._heartbeat = Heartbeat(
            self._ctx,
            self.coordinator,
            "worker",
            self.rank,
            int(view["token"]),
            self.timeouts.heartbeat_interval,
            status=lambda: {"clock": self._clock, "examples": self._examples},
            security=self._security,
        )
        self._token = int(view["token"])
        self._heartbeat.start()
        log.info("worker[%d] joined the cluster at %s", self.rank, self.coordinator)

    def _why_no_registration(self, what: str, probe: Future[dict[str, Any]]) -> str:
        if not probe.done() or probe.exception(0) is not None:
            return (
                f"{what}: no answer after {self.timeouts.connect:.3g}s; nothing answers at "
                f"{self.coordinator} (or it uses another cluster token)"
            )
        view = probe.result(0)["view"]
        missing = [r for r, _, state in view["servers"] if state == "pending"]
        if missing:
            return (
                f"{what}: no answer after {self.timeouts.connect:.3g}s; the coordinator is "
                f"still waiting for " + ", ".join(_server(r) for r in missing) + " to register"
            )
        return f"{what}: no answer after {self.timeouts.connect:.3g}s"

    def _on_message(self, peer: str, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        if header["kind"] == "view":
            self._apply_view(header["view"])

    def _apply_view(self, view: dict[str, Any]) -> None:
        epoch = view.get("epoch", 0)
        if not isinstance(epoch, int) or epoch <= self._epoch:
            return
        self._epoch = epoch
        self.view = view
        for rank, address, state in view.get("servers", []):
            name = _server(rank)
            if state == "alive" and address:
                old = self._ep.peers.get(name)
                if old is not None and (old.address != address or old.lost is not None):
                    self.replaced[rank] += 1
                self._ep.connect(name, address)
            elif state in ("dead", "left"):
                self._ep.mark_lost(
                    name, f"{name} at {address} was declared dead by the coordinator (view {epoch})"
                )
        if self._resends:
            self._resend_to_replaced()

    # ---- requests to servers that may be replaced -----------------------------------------

    def _server_request(
        self,
        s: int,
        header: dict[str, Any],
        arrays: Sequence[np.ndarray] = (),
        *,
        what: str,
        parse: Callable[[Message], Any] | None = None,
        sink: np.ndarray | None = None,
        again: Callable[[], tuple[dict[str, Any], Sequence[np.ndarray], Any]] | None = None,
        reply_bytes: int | None = None,
        bulk: bool = False,
    ) -> Future[Any]:
        """A request to server ``s`` that survives its replacement: if the server is lost, wait
        (up to the request timeout) for a view in which a new server holds rank ``s``, then send
        the same request again (a push keeps its sequence number); ``again`` gives the header,
        arrays and parse of a resend when it must differ (no shared memory with a new server).

        With ``reply_bytes`` (at most what the reply's arrays take), the request may travel in
        a shared-memory slot when the server is on this host (see :mod:`paramserver.slots`):
        ``parse`` must then be given and must not keep the reply's arrays (the slot is reused
        once it returns)."""
        name = _server(s)
        outer: Future[Any] = Future(self._ep, what)
        # a pull carries its own timeout: the wait for a replacement is bounded by it too
        wait = float(header.get("timeout") or self.timeouts.request)
        deadline = time.monotonic() + wait

        def attempt(use_slot: bool = True) -> None:
            peer = self._ep.peers.get(name)
            got = None
            if use_slot and reply_bytes is not None:
                pool = self._slot_pool(s)
                at = reply_offset(list(arrays))
                if pool is not None and at + reply_bytes >= SLOT_MIN_BYTES:
                    got = pool.take(at + reply_bytes)
            if got is None:
                fut = self._ep.request(
                    name, header, arrays, what=what, parse=parse, sink=sink, bulk=bulk
                )
            else:
                assert pool is not None
                slot, region = got
                fut = self._ep.request(
                    name,
                    {**header, "slot": slot, "reply_at": at},
                    arrays,
                    what=what,
                    parse=parse,
                    region=region,
                    release=lambda: pool.release(slot),
                )

            def done(f: Future[Any]) -> None:
                err = f._error
                if err is None:
                    outer.set_result(f._value)
                elif isinstance(err, RemoteError) and err.code == "no_slot" and got is not None:
                    # the server does not know the slot (it was restarted): start afresh
                    self._drop_slots(s)
                    attempt(use_slot=False)
                elif isinstance(err, NodeLostError) and not self._closed:

                    def give_up() -> None:
                        outer.set_exception(
                            NodeLostError(f"{err} (no replacement for {name} within {wait:.3g}s)")
                        )

                    self._resends.setdefault(s, []).append((deadline, peer, resend, give_up))
                else:
                    outer.set_exception(err)

            fut.add_done_callback(done)

        def resend() -> None:
            nonlocal header, arrays, parse
            if again is not None:
                header, arrays, parse = again()
            attempt()

        attempt()
        return outer

    def _slot_pool(self, s: int) -> SlotPool | None:
        """The shared-memory slots with server ``s`` (None: not with ``transport="tcp"``)."""
        if self.transport != "auto" or self._closed:
            return None
        made = self._slot_pools.get(s)
        if made is not None and made[0] == self.replaced[s]:
            return made[1]
        if made is not None:
            made[1].close()  # a new server process: it knows none of them
        pool = SlotPool(self._ep, _server(s), self.rank)
        self._slot_pools[s] = (self.replaced[s], pool)
        return pool

    def _drop_slots(self, s: int) -> None:
        made = self._slot_pools.pop(s, None)
        if made is not None:
            made[1].close()

    def _resend_to_replaced(self) -> None:
        for s, waiting in list(self._resends.items()):
            peer = self._ep.peers.get(_server(s))
            ready = [w for w in waiting if peer is not None and peer is not w[1] and not peer.lost]
            if not ready:
                continue
            self._resends[s] = [w for w in waiting if w not in ready]
            if not self._resends[s]:
                del self._resends[s]
            log.info("worker[%d]: resending %d requests to %s", self.rank, len(ready), _server(s))
            for _, _, again, _ in ready:
                again()

    def _expire_resends(self) -> float | None:
        """Fail the resends whose deadline passed; the next deadline, if any."""
        if not self._resends:
            return None
        now = time.monotonic()
        soonest: float | None = None
        for s, waiting in list(self._resends.items()):
            keep = []
            for w in waiting:
                if now >= w[0]:
                    w[3]()
                else:
                    keep.append(w)
                    soonest = w[0] if soonest is None else min(soonest, w[0])
            if keep:
                self._resends[s] = keep
            else:
                del self._resends[s]
        return soonest

    def _check(self) -> None:
        if self._closed:
            raise ConfigError("this client is closed")
        hb = self._heartbeat
        if hb is not None and hb.expelled:
            raise NodeLostError(
                f"worker[{self.rank}] was dropped by the coordinator: {hb.expelled}"
            )

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ---- tables ---------------------------------------------------------------------------

    def _create(self, spec: TableSpec) -> TableSpec:
        self._check()
        reply = self._ep.request(
            "coordinator",
            {"kind": "create_table", "spec": spec.to_wire()},
            what=f"creating table {spec.name!r} on the coordinator at {self.coordinator}",
        ).result(self.timeouts.request)
        final = TableSpec.from_wire(reply["spec"])
        futs = [
            self._server_request(
                s,
                {"kind": "create_shard", "spec": final.to_wire()},
                what=f"creating table {spec.name!r} on {_server(s)}",
            )
            for s in range(self.num_servers)
        ]
        for f in futs:
            f.result(self.timeouts.request)
        return final

    def sparse_table(
        self,
        name: str,
        dim: int,
        *,
        dtype: str = "float32",
        init: Initializer | None = None,
        optimizer: Optimizer | None = None,
        consistency: str | None = None,
        seed: int | None = None,
        nonfinite: str = "reject",
        max_rows: int | None = None,
        codec: str = "none",
    ) -> SparseTable:
        """Create (or open, if it exists with the same spec) a sparse table of rows of ``dim``.

        ``nonfinite``: a push with NaN or Inf is refused whole ("reject", the default), or its
        rows holding them are dropped and the rest applied ("skip"; counted in ``stats()``).
        ``max_rows``: at most this many rows on each server; a pull or push that would create
        more is refused with :class:`~paramserver.errors.RemoteError` (code ``"full"``) and
        changes nothing.

        ``codec`` ("none", "float16", "bfloat16" or "int8" with a per-row scale) is how pulled
        rows travel: fewer bytes, rounded values (see :mod:`paramserver.codec`).

        Example:
            emb = client.sparse_table("emb", dim=16, init=ps.init.Normal(std=0.01),
                                      optimizer=ps.optim.Adagrad(lr=0.05), consistency="async")
        """
        spec = TableSpec(
            name=name,
            kind="sparse",
            dim=dim,
            dtype=dtype,
            init=init or Zeros(),
            optimizer=optimizer or SGD(),
            consistency=_consistency(consistency),
            seed=seed,
            nonfinite=nonfinite,
            max_rows=max_rows,
            codec=codec,
        )
        final = self._create(spec)
        table = SparseTable(self, final)
        self._tables[name] = table
        return table

    def dense_table(
        self,
        name: str,
        shape: int | tuple[int, ...],
        *,
        dtype: str = "float32",
        init: Initializer | None = None,
        optimizer: Optimizer | None = None,
        consistency: str | None = None,
        seed: int | None = None,
        nonfinite: str = "reject",
    ) -> DenseTable:
        """Create (or open) a dense table: one array of ``shape``, split over servers if large.

        Example:
            w = client.dense_table("mlp", shape=(4096,), optimizer=ps.optim.Adam(lr=1e-3),
                                   consistency="sync")
        """
        shp = (shape,) if isinstance(shape, int) else tuple(shape)
        spec = TableSpec(
            name=name,
            kind="dense",
            shape=shp,
            dtype=dtype,
            init=init or Zeros(),
            optimizer=optimizer or SGD(),
            consistency=_consistency(consistency),
            seed=seed,
            nonfinite=nonfinite,
        )
        final = self._create(spec)
        table = DenseTable(self, final)
        self._tables[name] = table
        return table

    # ---- clocks and barriers --------------------------------------------------------------

    @property
    def current_clock(self) -> int:
        """This worker's clock: how many times it has called :meth:`clock`."""
        return self._clock

    def clock(self) -> int:
        """End this worker's iteration; returns the new clock.

        Example:
            for step in range(100):
                ...; client.clock()
        """
        self._check()
        for f in self._clock_futures:
            if f.done() and f.exception(0) is not None:
                raise f.exception(0)  # type: ignore[misc]
        self._clock += 1
        self._clock_futures = [
            self._server_request(
                s,
                {"kind": "clock", "rank": self.rank, "clock": self._clock},
                what=f"clock {self._clock} of worker[{self.rank}] to {_server(s)}",
            )
            for s in range(self.num_servers)
        ]
        self._ep.poll(0)
        return self._clock

    def report(self, *, examples: int) -> None:
        """Count ``examples`` more training examples done by this worker; the count goes to the
        coordinator with the heartbeats, where ``paramserver status`` and the metrics show it
        with its rate (examples/s).

        Example:
            client.report(examples=len(batch)); client.clock()
        """
        if not isinstance(examples, int) or isinstance(examples, bool) or examples < 0:
            raise ConfigError(f"examples must be a non-negative integer, got {examples!r}")
        self._examples += examples

    def barrier(self, name: str = "barrier", *, timeout: float | None = None) -> None:
        """Wait until every live worker has reached this barrier.

        Example:
            client.barrier()            # all workers meet here
        """
        self._check()
        limit = self.timeouts.request if timeout is None else timeout
        self._barriers[name] += 1
        fut = self._ep.request(
            "coordinator",
            {
                "kind": "barrier",
                "name": f"{name}#{self._barriers[name]}",
                "rank": self.rank,
                "timeout": limit,
            },
            what=f"barrier {name!r} of worker[{self.rank}] (coordinator at {self.coordinator})",
        )
        fut.result(limit + 2.0)

    def save(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> str:
        """Write a consistent checkpoint of every table at this worker's clock boundary.

        Every server snapshots its shards when all live workers have reached this worker's
        clock (for ``sync`` tables: exactly the updates of earlier clocks), then the coordinator
        writes the manifest and makes the checkpoint visible by one rename. ``path`` must be on
        storage every server and the coordinator can reach. Returns the checkpoint directory.

        Example:
            client.save("ckpt/")       # later: ps.LocalCluster(restore="ckpt/")
        """
        self._check()
        limit = self.timeouts.request if timeout is None else timeout
        root = os.path.abspath(os.fspath(path))
        reply = self._ep.request(
            "coordinator",
            {"kind": "save", "path": root, "clock": self._clock, "timeout": limit},
            what=f"checkpoint into {root} at clock {self._clock}",
        ).result(limit + 2.0)
        return str(reply["path"])

    def stats(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Per-server statistics: rows and bytes per table, clocks.

        Example:
            for s in client.stats(): print(s["rank"], s["tables"])
        """
        self._check()
        futs = [
            self._ep.request(_server(s), {"kind": "stats"}, what=f"stats of {_server(s)}")
            for s in range(self.num_servers)
        ]
        return [f.result(timeout)["stats"] for f in futs]

    def tables(self) -> list[TableSpec]:
        """The specs of every table in the cluster."""
        reply = self._ep.request(
            "coordinator", {"kind": "list_tables"}, what="listing tables"
        ).result()
        return [TableSpec.from_wire(t) for t in reply["tables"]]

    # ---- data leases ----------------------------------------------------------------------

    def acquire_lease(
        self, dataset: str, epoch: int, shards: int, *, timeout: float | None = None
    ) -> int | None:
        """Take the next shard of ``dataset`` in ``epoch`` (``shards`` in all); None when every
        shard of the epoch has been handed out.

        Example:
            shard = client.acquire_lease("criteo/train", epoch=1, shards=64)
        """
        self._check()
        reply = self._ep.request(
            "coordinator",
            {
                "kind": "acquire_lease",
                "dataset": dataset,
                "epoch": epoch,
                "shards": shards,
                "rank": self.rank,
            },
            what=f"lease on {dataset!r} epoch {epoch} from the coordinator at {self.coordinator}",
        ).result(timeout)
        shard = int(reply.get("shard", -1))
        return None if shard < 0 else shard

    def complete_lease(
        self, dataset: str, epoch: int, shard: int, *, timeout: float | None = None
    ) -> None:
        """Report shard ``shard`` of ``dataset`` in ``epoch`` as read and trained on."""
        self._check()
        self._ep.request(
            "coordinator",
            {
                "kind": "complete_lease",
                "dataset": dataset,
                "epoch": epoch,
                "shard": shard,
                "rank": self.rank,
            },
            what=f"completing lease {shard} of {dataset!r} epoch {epoch}",
        ).result(timeout)

    def leases(self, dataset: str, epoch: int, shards: int) -> Iterator[int]:
        """Shards of ``dataset`` for this worker in ``epoch``: each is completed when the loop
        asks for the next one; the iterator ends when none is left.

        Example:
            for shard in client.leases("criteo/train", epoch, len(shard_list)):
                train_on(shard_list[shard])
        """
        while True:
            shard = self.acquire_lease(dataset, epoch, shards)
            if shard is None:
                return
            yield shard
            self.complete_lease(dataset, epoch, shard)

    # ---- life -----------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the cluster (other workers stop waiting for this one) and close the sockets."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._heartbeat is not None:
                self._ep.request(
                    "coordinator",
                    {"kind": "leave", "role": "worker", "rank": self.rank, "token": self._token},
                    what="leave",
                ).result(2.0)
        except Exception as exc:  # leaving is best effort; the heartbeat timeout covers the rest
            log.debug("leave failed: %s", exc)
        finally:
            if self._heartbeat is not None:
                self._heartbeat.stop()
                self._heartbeat.join(timeout=2)
            for _, pool in self._slot_pools.values():
                pool.close()
            self._ep.close()
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _consistency(value: str | None) -> str:
    if value is None:
        return from_env().consistency
    parse_consistency(value)
    return value


def as_keys(keys: Any, table: str) -> np.ndarray:
    """Validate keys (non-negative integers) and return them as uint64, any shape."""
    arr = np.asarray(keys)
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype.kind == "u" or (arr.dtype.kind == "i"):
        if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
            bad = int(np.flatnonzero(arr.reshape(-1) < 0)[0])
            raise ConfigError(
                f"table {table!r}: keys must be non-negative integers, got "
                f"{arr.reshape(-1)[bad]} at position {bad}"
            )
        return arr.astype(np.uint64)
    raise ConfigError(
        f"table {table!r}: keys must be an array of unsigned integers, got dtype {arr.dtype}"
    )


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
        if self.spec.nonfinite == "reject" and not _all_finite(g):
            raise ConfigError(
                f"table {self.name!r}: gradient contains NaN or Inf; push refused, "
                "the table is unchanged (create the table with nonfinite='skip' to drop such "
                "rows instead)"
            )
        return np.ascontiguousarray(g)

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
        header = {
            "kind": "push",
            "table": self.name,
            "rank": c.rank,
            "clock": c._clock,
            "seq": c._next_seq(),
        }
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


def _all_finite(g: np.ndarray) -> bool:
    # A dot product is finite only if every element is (inf and NaN propagate); it runs at
    # memory speed without temporaries. Only when it overflows is the exact check needed.
    if g.dtype.kind == "f" and g.ndim >= 1 and g.flags.c_contiguous and g.size:
        flat = g.reshape(-1)
        with np.errstate(all="ignore"):
            if all(np.isfinite(d) for d in halves(np.dot, [flat, flat])):
                return True
    return bool(np.isfinite(g).all())


def _is_sorted(a: np.ndarray) -> bool:
    return bool(len(a) < 2 or (a[1:] > a[:-1]).all())


class DenseTable(_Handle):
    """Handle on a dense table: one array of ``shape``.

    With servers on the same host (and ``transport="auto"``) values travel through a shared
    memory segment per table and worker: only headers go over the socket.

    Example:
        w = dense.pull(); dense.push(np.ones_like(w)).result()
    """

    def __init__(self, client: Client, spec: TableSpec) -> None:
        super().__init__(client, spec)
        self._seg: shm.Segment | None = None
        self._shm_tried = False
        self._lane_servers: Counter[int] = Counter()  # client.replaced when the lane was made
        self._last_push: Future[None] | None = None
        self._sendbuf: np.ndarray | None = None
        self._recvbuf: np.ndarray | None = None

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
        if c.transport != "auto":
            self._shm_tried = True
            return None
        seg = shm.create(self.spec.size * self.dtype.itemsize)
        if seg is None:
            self._shm_tried = True
            return None
        ok = True
        try:
            futs = [
                c._ep.request(
                    _server(s),
                    {
                        "kind": "attach",
                        "table": self.name,
                        "rank": c.rank,
                        "path": seg.path,
                        "nonce": seg.nonce,
                    },
                    what=f"attaching shared memory for table {self.name!r} on {_server(s)}",
                )
                for s, _, _ in self.spec.ranges
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
            self._lane_servers = Counter(c.replaced)
        else:
            seg.close()
        return self._seg

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
            (b - a) * self.dtype.itemsize >= bulk.MIN_BYTES
            and c.transport != "zmq"
            and c._ep.open_bulk(_server(s), c.rank, c.timeouts.heartbeat_timeout)
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
        self.client._check()
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
        c._check()
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
        header = self._pull_header(True, limit)
        if seg is not None:
            header["shm"] = True
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
                assert seg is not None
                if len(msg[1]) != 1 or msg[1][0].shape != (b - a,):
                    raise ConfigError(f"table {self.name!r}: server answered a wrong shape")
                seg.reply.view(self.dtype)[a:b] = msg[1][0]

            return parse

        tcp_header = {k: v for k, v in header.items() if k != "shm"}

        ranges = self.spec.ranges
        # over TCP, replies are assembled straight into the result (no second copy)
        dest = None
        if seg is None:
            if out is None and not copy:  # a read-only view of a reused receive buffer
                if self._recvbuf is None:
                    self._recvbuf = np.empty(self.shape, self.dtype)
                out_ = self._recvbuf
            else:
                out_ = out if out is not None else np.empty(self.shape, self.dtype)
            dest = out_.reshape(-1)
        item = self.dtype.itemsize
        futs = [
            c._server_request(
                s,
                header,
                what=f"pull of table {self.name!r} [{a}:{b}] from {_server(s)} "
                f"({c._ep.address_of(_server(s))})",
                parse=part,
                sink=None if dest is None else dest.view(np.uint8)[a * item : b * item],
                bulk=self._bulk(s, a, b),
            )
            if seg is None
            else c._server_request(
                s,
                tcp_header if self._over_tcp(s) else header,
                what=f"pull of table {self.name!r} [{a}:{b}] from {_server(s)} "
                f"({c._ep.address_of(_server(s))})",
                parse=part_by_tcp(a, b) if self._over_tcp(s) else part,
                again=lambda a=a, b=b: (tcp_header, [], part_by_tcp(a, b)),  # type: ignore[misc]
            )
            for s, a, b in ranges
        ]

        def combine(results: list[np.ndarray | None]) -> np.ndarray:
            self._record(staleness)
            if seg is not None:
                view = seg.reply.view(self.dtype)[: self.spec.size].reshape(self.shape)
                if out is not None:
                    np.copyto(out, view)
                    return out
                if copy:
                    return view.copy()
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

        return gather(futs, f"pull of table {self.name!r}", combine)

    def pull(
        self,
        *,
        timeout: float | None = None,
        out: np.ndarray | None = None,
        copy: bool = True,
    ) -> np.ndarray:
        """Return the whole array: a fresh, writable copy; or written into ``out`` (reused, no
        allocation); or, with ``copy=False``, a read-only view of this worker's receive buffer
        (on the same host the shared reply buffer: no copy at all), valid until this worker's
        next push or pull of the table.

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
        Over the TCP bulk channel it returns once the sockets have taken the gradient.

        Example:
            dense.push(grad).result()
        """
        c = self.client
        c._check()
        g = self._check_grads(grad, self.shape).reshape(-1)
        seg = self._lane()
        header = {
            "kind": "push",
            "table": self.name,
            "rank": c.rank,
            "clock": c._clock,
            "seq": c._next_seq(),
        }
        if seg is not None:
            mine = seg.grad.view(self.dtype)[: self.spec.size]
            if g.ctypes.data != mine.ctypes.data:
                self._wait_push()  # the server may still be reading the previous gradient
                np.copyto(mine, g)
            header["shm"] = True
            # _check_grads found every value finite: the servers need not scan it again
            header["checked"] = self.spec.nonfinite == "reject"
            arrays: list[list[np.ndarray]] = [[] for _ in self.spec.ranges]
        else:
            if self._sendbuf is not None and g.ctypes.data == self._sendbuf.ctypes.data:
                self._wait_push()
            arrays = [[g[a:b]] for _, a, b in self.spec.ranges]
        if seg is not None:
            # a replacement server has no shared memory: it gets its part of the gradient by TCP
            tcp_header = {k: v for k, v in header.items() if k not in ("shm", "checked")}
            grad = seg.grad.view(self.dtype)
            tcp = {s: (tcp_header, [grad[a:b]], None) for s, a, b in self.spec.ranges}
            for i, (s, _, _) in enumerate(self.spec.ranges):
                if self._over_tcp(s):
                    arrays[i] = tcp[s][1]
        futs = [
            c._server_request(
                s,
                tcp[s][0] if seg is not None and self._over_tcp(s) else header,
                arr,
                what=f"push to table {self.name!r} [{a}:{b}] on {_server(s)}",
                again=None if seg is None else (lambda s=s: tcp[s]),  # type: ignore[misc]
                bulk=seg is None and self._bulk(s, a, b),
            )
            for (s, a, b), arr in zip(self.spec.ranges, arrays, strict=True)
        ]
        c._ep.poll(0)
        fut: Future[None] = gather(futs, f"push to table {self.name!r}", lambda _: None)
        self._last_push = fut
        return fut
