"""The worker's handle on a cluster: membership, table creation, clock, barriers, leases, and
requests to servers that survive their replacement. The table handles are in
:mod:`paramserver.client.sparse` (sparse) and :mod:`paramserver.client.dense`.

A :class:`Client` registers with the coordinator as a worker, connects one DEALER to every
server and drives those sockets from the calling thread: every call returns (or is) a
:class:`~paramserver.wire.transport.Future`, and requests to different servers are all sent before
any answer is awaited, so they proceed in parallel.
"""

from __future__ import annotations

import logging
import os
import socket as pysocket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from paramserver.client.dense import DenseTable
from paramserver.client.sparse import SparseTable, _server
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
from paramserver.partition import HashRing
from paramserver.spec import TableSpec
from paramserver.wire.protocol import SLOT_MIN_BYTES, slot_end
from paramserver.wire.slots import SlotPool
from paramserver.wire.transport import (
    Endpoint,
    Future,
    Heartbeat,
    Message,
    Security,
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
        # Beat first: building the ring can compile kernels, longer than a heartbeat timeout
        # on a loaded machine.
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
        self.ring = HashRing.build(list(range(self.num_servers)))
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
        a shared-memory slot when the server is on this host (see :mod:`paramserver.wire.slots`):
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
                at = slot_end(arrays)
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
        rows travel: fewer bytes, rounded values (see :mod:`paramserver.wire.codec`).

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
