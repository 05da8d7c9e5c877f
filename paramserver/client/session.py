"""A worker's session with a cluster: registration, view changes, requests to servers that
survive their replacement, shared-memory slot pools, sequence numbers and the clock.

A :class:`Session` registers with the coordinator as a worker, connects one DEALER to every
server and drives those sockets from the calling thread: every call returns (or is) a
:class:`~paramserver.wire.transport.Future`, and requests to different servers are all sent before
any answer is awaited, so they proceed in parallel. It knows no table: the table handles
(:mod:`paramserver.client.sparse`, :mod:`paramserver.client.dense`) call its public methods,
and :class:`~paramserver.client.worker.Client` builds on it."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Self, TypedDict, Unpack

import numpy as np

from paramserver.client.replicas import request_copies, settle
from paramserver.client.ring import RingRouting
from paramserver.client.warm import start_warming
from paramserver.client.watch import CoordinatorWatch
from paramserver.config import Timeouts, from_env, parse_transport
from paramserver.errors import ConfigError, NodeLostError, PSTimeoutError, RemoteError
from paramserver.metrics import MAX_SCALARS, check_scalar
from paramserver.wire.messages import INCARNATION, VIEW_NUMBER, register_header
from paramserver.wire.protocol import SLOT_MIN_BYTES, slot_end
from paramserver.wire.slots import SlotPool
from paramserver.wire.transport import (
    Endpoint,
    Future,
    Message,
    Pulse,
    Security,
    new_context,
)

__all__ = ["RequestOptions", "Session", "clock_hint", "server_name"]

log = logging.getLogger(__name__)

# a request waiting for a lost server (see Session.request_one)
Resend = tuple[float, object, Callable[[], None], Callable[[], None], Callable[[], None] | None]


class RequestOptions(TypedDict, total=False):
    """How a request to a server travels and is answered (see :meth:`Session.request_one`)."""

    parse: Callable[[Message], Any] | None
    sink: np.ndarray | None
    again: Callable[[], tuple[dict[str, Any], Sequence[np.ndarray], Any]] | None
    reply_bytes: int | None
    bulk: bool
    lend: bool


def server_name(rank: int) -> str:
    """The endpoint's name for server ``rank``.

    Example:
        server_name(2)   # "server[2]"
    """
    return f"server[{rank}]"


_BEHIND = re.compile(r"worker\[(\d+)\] at clock (\d+)")


def clock_hint(err: BaseException, header: dict[str, Any]) -> BaseException:
    """A pull that timed out waiting for slower workers: the server's error plus the question
    that usually finds the bug (a worker that never calls ``clock()`` holds every sync pull).

    Example:
        clock_hint(RemoteError("... for worker[1] at clock 0", code="timeout"),
                   {"kind": "pull", "clock": 3})   # "...; did worker[1] call clock()? ..."
    """
    if not (
        isinstance(err, RemoteError) and err.code == "timeout" and header.get("kind") == "pull"
    ):
        return err
    behind = [f"worker[{r}]" for r, c in _BEHIND.findall(err.reason) if int(c) < header["clock"]]
    if not behind:
        return err
    return RemoteError(
        f"{err.reason}; did {' and '.join(behind)} call clock()? (a pull at clock "
        f"{header['clock']} waits until every live worker has called client.clock() that often)",
        node=err.node,
        code=err.code,
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


class Session(CoordinatorWatch, RingRouting):
    """A worker's membership of the cluster and its requests to servers: registration, view
    changes, resends to a replaced server, shared-memory slot pools, sequence numbers and the
    clock. :class:`~paramserver.client.worker.Client` adds tables, barriers, leases and
    checkpoints; table handles call the public methods here.

    Example:
        session = Session("127.0.0.1:7000")
        session.request_server(0, {"kind": "stats"}, what="stats").result()
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
        start_warming()  # numba and the first request's kernels load while this registers
        self.coordinator = coordinator
        self.timeouts = timeouts or Timeouts()
        self._security = Security.from_token(token) if token is not None else None
        self.transport = from_env().transport if transport is None else parse_transport(transport)
        self._ctx = new_context()
        self._ep = _Endpoint(
            self._ctx, self.timeouts.request, on_message=self._on_message, security=self._security
        )
        self._ep.expire = self._expire_resends
        # server rank -> how many times a new process took it over (shared memory is not shared
        # with a replacement: dense tables reach it over TCP)
        self.replaced: Counter[int] = Counter()
        # server rank -> requests waiting for that server to come back: (deadline, lost peer,
        # resend, give up, fail over: with replication, what to do once the server is dead)
        self._resends: dict[int, list[Resend]] = {}
        # copies of every range (view "replication", see client/replicas.py) and each
        # server's state in the newest view
        self.replication = 1
        self.server_states: dict[int, str] = {}
        self._ep.connect("coordinator", coordinator)
        # server rank -> (its ``replaced`` count when made, shared-memory slots with it)
        self._slot_pools: dict[int, tuple[int, SlotPool]] = {}
        self._clock = 0
        # called by clock() before the clock goes out (a cached table flushes its gradients)
        self.before_clock: list[Callable[[], object]] = []
        self._examples = 0  # reported by report(); sent with heartbeats (paramserver status)
        self._scalars: dict[str, float] = {}  # the newest of each report(name=value)
        self._traffic: dict[str, list[int]] = {}  # table -> [bytes sent, bytes received]
        # Sequence numbers start from the wall clock so a restarted worker never reuses one.
        self._seq = time.time_ns()
        self._clock_futures: list[Future[Any]] = []
        self._closed = False
        self._view_number = 0
        self.view: dict[str, Any] = {}
        self._heartbeat: Pulse | None = None
        self._expelled = None  # why the coordinator refused our heartbeat
        self._init_watch()
        try:
            self._register(rank)
        except BaseException:
            self._ep.close()
            self._ctx.term()
            raise
        self._opened()

    def _opened(self) -> None:
        """Called once registered, at the end of ``__init__``: where a subclass sets up its own
        state (it takes the same arguments)."""

    # ---- membership -----------------------------------------------------------------------

    def _register(self, rank: int | None) -> None:
        what = f"worker registering with the coordinator at {self.coordinator}"
        fut = self._ep.request(
            "coordinator",
            register_header("worker", rank),
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
        self._supervised = bool(view.get("supervised"))
        self.replication = int(view.get("replication") or 1)
        self._apply_view(view)
        # Beat first: building the ring can compile kernels, longer than a heartbeat timeout
        # on a loaded machine.
        self._incarnation = int(view[INCARNATION])
        self._heartbeat = Pulse(
            self._ctx,
            self.coordinator,
            self._beat,
            self.timeouts.heartbeat_interval,
            on_answer=self._beat_answered,
            security=self._security,
            name=f"heartbeat-worker[{self.rank}]",
        )
        self._heartbeat.start()
        self.build_ring(self.num_servers)
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
                f"still waiting for " + ", ".join(server_name(r) for r in missing) + " to register"
            )
        return f"{what}: no answer after {self.timeouts.connect:.3g}s"

    def _on_message(self, peer: str, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        if header["kind"] == "view":
            self._apply_view(header["view"])

    def _apply_view(self, view: dict[str, Any]) -> None:
        number = view.get(VIEW_NUMBER, 0)
        if not isinstance(number, int) or number <= self._view_number:
            return
        self._view_number = number
        self.view = view
        self.server_states = {int(r): str(st) for r, _, st in view.get("servers", [])}
        for rank, address, state in view.get("servers", []):
            name = server_name(rank)
            if state == "alive" and address:
                old = self._ep.peers.get(name)
                if old is not None and (old.address != address or old.lost is not None):
                    self.replaced[rank] += 1
                self._ep.connect(name, address)
            elif state in ("dead", "left", "rebuilding") and not self.writes_to(rank, address):
                self._ep.mark_lost(
                    name,
                    f"{name} at {address} was declared dead by the coordinator (view {number})",
                )
        self.take_ring(view)
        if self._resends:
            self._fail_over()
            self._resend_to_replaced()

    # ---- requests to servers that may be replaced -----------------------------------------

    def request_server(
        self,
        s: int,
        header: dict[str, Any],
        arrays: Sequence[np.ndarray] = (),
        *,
        what: str,
        **options: Unpack[RequestOptions],
    ) -> Future[Any]:
        """A request about what server ``s`` owns. Without replication: :meth:`request_one`
        to ``s``. With it, reads go to the first live copy and fail over to the next, writes to
        every live copy (see :mod:`paramserver.client.replicas`)."""
        if self.replication > 1:
            return request_copies(self, s, header, arrays, what=what, **options)
        return self.request_one(s, header, arrays, what=what, **options)

    def server_alive(self, s: int) -> bool:
        """Whether the newest view lists server ``s`` as alive (it serves its ranges)."""
        return self.server_states.get(s) in ("alive", "pending")

    def request_one(
        self,
        s: int,
        header: dict[str, Any],
        arrays: Sequence[np.ndarray] = (),
        *,
        what: str,
        on_dead: Callable[[], Future[Any]] | None = None,
        **options: Unpack[RequestOptions],
    ) -> Future[Any]:
        """A request to server ``s`` that survives its replacement: if the server is lost, wait
        (up to the request timeout) for a view in which a new server holds rank ``s``, then send
        the same request again (a push keeps its sequence number); ``again`` gives the header,
        arrays and parse of a resend when it must differ (no shared memory with a new server).

        With ``reply_bytes`` (at most what the reply's arrays take), the request may travel in
        a shared-memory slot when the server is on this host (:mod:`paramserver.wire.slots`):
        ``parse`` must then be given and keeps no reply array unless ``lend`` lets it.

        With ``on_dead`` (replication), a lost server's request is not kept for a replacement
        once a view declares the server dead or rebuilding: the request completes as the
        future ``on_dead()`` gives (the next copy's answer)."""
        parse, sink, again = options.get("parse"), options.get("sink"), options.get("again")
        reply_bytes, bulk = options.get("reply_bytes"), options.get("bulk", False)
        name = server_name(s)
        outer: Future[Any] = Future(self._ep, what)
        if "table" in header and header["kind"] in ("pull", "push"):
            parse = self._count_bytes(header["table"], arrays, parse)
        # a pull carries its own timeout: the wait for a replacement is bounded by it too
        wait = float(header.get("timeout") or self.timeouts.request)
        deadline = time.monotonic() + wait
        # attempt and resend call each other through this list, emptied by the outcome: a cycle
        # of closures would hold the request's arrays and sink (a pull's result, which the
        # table's pool reuses once nobody holds it) until the garbage collector ran
        again_: list[Callable[..., None]] = []

        def attempt(use_slot: bool = True) -> None:
            peer = self._ep.peers.get(name)
            # the view it is sent in: a server that was replaced since refuses it (fencing)
            sent = {**header, "view": self._view_number}
            got = None
            if use_slot and reply_bytes is not None:
                pool = self.slot_pool(s)
                at = slot_end(arrays)
                if pool is not None and at + reply_bytes >= SLOT_MIN_BYTES:
                    got = pool.take(at + reply_bytes, arrays)
            if got is None:
                fut = self._ep.request(
                    name, sent, arrays, what=what, parse=parse, sink=sink, bulk=bulk
                )
            else:
                assert pool is not None
                slot, region = got
                fut = self._ep.request(
                    name,
                    {**sent, "slot": slot, "reply_at": at},
                    arrays,
                    what=what,
                    parse=pool.lending(slot, parse) if options.get("lend") and parse else parse,
                    region=region,
                    release=lambda: pool.release(slot),
                )

            def done(f: Future[Any]) -> None:
                err = f.exception(0)  # done: no wait
                if err is None:
                    outer.set_result(f.result(0))
                elif isinstance(err, RemoteError) and err.code == "no_slot" and got is not None:
                    # the server does not know the slot (it was restarted): start afresh
                    self._drop_slots(s)
                    again_[0](use_slot=False)
                elif isinstance(err, NodeLostError) and self.moot_when_left(s, header["kind"]):
                    outer.set_result({"kind": "ok"})
                elif isinstance(err, NodeLostError) and not self._closed:

                    def give_up() -> None:
                        outer.set_exception(
                            NodeLostError(f"{err} (no replacement for {name} within {wait:.3g}s)")
                        )

                    self._resends.setdefault(s, []).append(
                        (deadline, peer, again_[1], give_up, fail_over)
                    )
                    if on_dead is not None and not self.server_alive(s):
                        self._fail_over()
                else:
                    outer.set_exception(clock_hint(err, header))

            fut.add_done_callback(done)

        fail_over: Callable[[], None] | None = None
        if on_dead is not None:
            dead = on_dead

            def fail_over() -> None:
                nxt = dead()
                nxt.add_done_callback(lambda f: settle(outer, f))

        def resend() -> None:
            nonlocal header, arrays, parse
            if again is not None:
                header, arrays, parse = again()
            attempt()

        again_ += [attempt, resend]
        outer.add_done_callback(lambda _: again_.clear())
        attempt()
        return outer

    def slot_pool(self, s: int) -> SlotPool | None:
        """The shared-memory slots with server ``s`` (None: not with ``transport="tcp"``)."""
        if self.transport != "auto" or self._closed:
            return None
        made = self._slot_pools.get(s)
        if made is not None and made[0] == self.replaced[s]:
            return made[1]
        if made is not None:
            made[1].close()  # a new server process: it knows none of them
        pool = SlotPool(self._ep, server_name(s), self.rank)
        self._slot_pools[s] = (self.replaced[s], pool)
        return pool

    def _drop_slots(self, s: int) -> None:
        made = self._slot_pools.pop(s, None)
        if made is not None:
            made[1].close()

    def _resend_to_replaced(self) -> None:
        for s, waiting in list(self._resends.items()):
            peer = self._ep.peers.get(server_name(s))
            ready = [w for w in waiting if peer is not None and peer is not w[1] and not peer.lost]
            if not ready:
                continue
            self._resends[s] = [w for w in waiting if w not in ready]
            if not self._resends[s]:
                del self._resends[s]
            log.info(
                "worker[%d]: resending %d requests to %s", self.rank, len(ready), server_name(s)
            )
            for _, _, again, _, _ in ready:
                again()

    def _fail_over(self) -> None:
        """With replication: the requests lost with a server the view declares dead or
        rebuilding go to the next copy at once (no waiting for a replacement)."""
        for s, waiting in list(self._resends.items()):
            if self.server_alive(s):
                continue
            moving = [w for w in waiting if w[4] is not None]
            if not moving:
                continue
            self._resends[s] = [w for w in waiting if w[4] is None]
            if not self._resends[s]:
                del self._resends[s]
            for w in moving:
                assert w[4] is not None
                w[4]()

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

    def coordinator_answers(self) -> bool:
        """Whether the coordinator answered a heartbeat within the last few intervals."""
        hb = self._heartbeat
        recent = 4 * self.timeouts.heartbeat_interval
        return hb is not None and time.monotonic() - hb.last_answer < recent

    @property
    def endpoint(self) -> Endpoint:
        """The sockets to the coordinator and the servers (driven from the calling thread)."""
        return self._ep

    def check(self) -> None:
        """Raise if this session is closed or the coordinator dropped this worker."""
        if self._closed:
            raise ConfigError("this client is closed")
        if self._expelled:
            self._rejoin(self._expelled)
        self._check_coordinator()
        self._catch_up_view()

    def next_seq(self) -> int:
        """A new push sequence number (a resent push keeps its own: servers skip repeats)."""
        self._seq += 1
        return self._seq

    # ---- the clock --------------------------------------------------------------

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
        self.check()
        for f in self._clock_futures:
            if f.done() and f.exception(0) is not None:
                raise f.exception(0)  # type: ignore[misc]
        for flush in self.before_clock:
            flush()
        self.end_step()  # a move's ring switched to, the new clock sent (client/ring.py)
        self._ep.poll(0)
        return self._clock

    def report(self, *, examples: int = 0, **scalars: float) -> None:
        """Count ``examples`` more training examples done by this worker, and set training
        scalars (``loss=0.41``, ``auc=0.78``: the newest value of each name counts). Both go to
        the coordinator with the heartbeats: ``paramserver status`` and the Prometheus metrics
        show them per worker and for the whole job (examples and examples/s summed over the
        workers, each scalar's mean, min and max over the workers that reported it).

        Example:
            client.report(examples=len(batch), loss=float(loss)); client.clock()
        """
        if not isinstance(examples, int) or isinstance(examples, bool) or examples < 0:
            raise ConfigError(f"examples must be a non-negative integer, got {examples!r}")
        for name, value in scalars.items():
            check_scalar(name, value)
        if len(self._scalars.keys() | scalars.keys()) > MAX_SCALARS:
            raise ConfigError(
                f"report: at most {MAX_SCALARS} scalar names per worker, got "
                f"{sorted(self._scalars.keys() | scalars.keys())}"
            )
        self._examples += examples
        self._scalars.update({k: float(v) for k, v in scalars.items()})

    def _beat(self) -> dict[str, Any]:
        """This worker's heartbeat (built on the heartbeat thread: copies, no iteration): the
        watch's beat, with the training scalars and bytes the worker reports."""
        beat = super()._beat()
        if self._scalars or self._traffic:
            traffic = self._traffic.copy()
            beat["metrics"] = {
                "scalars": self._scalars.copy(),
                "bytes": {t: [int(v[0]), int(v[1])] for t, v in traffic.items()},
            }
        return beat

    def _count_bytes(
        self,
        table: str,
        arrays: Sequence[np.ndarray],
        parse: Callable[[Message], Any] | None,
    ) -> Callable[[Message], Any]:
        """Count a table's bytes sent now and received with the answer (per request: the
        status shows bytes/s per table)."""
        counts = self._traffic.get(table)
        if counts is None:
            counts = self._traffic[table] = [0, 0]
        counts[0] += sum(a.nbytes for a in arrays)

        def counted(msg: Message) -> Any:
            counts[1] += sum(a.nbytes for a in msg[1])
            return parse(msg) if parse is not None else msg[0]

        return counted

    # ---- life -----------------------------------------------------------------------------

    def close(self, *, leave_timeout: float = 2.0) -> None:
        """Leave the cluster (other workers stop waiting for this one) and close the sockets;
        the coordinator's answer to the leave is awaited up to ``leave_timeout`` seconds."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._heartbeat is not None:
                self._ep.request(
                    "coordinator",
                    {
                        "kind": "leave",
                        "role": "worker",
                        "rank": self.rank,
                        INCARNATION: self._incarnation,
                    },
                    what="leave",
                ).result(leave_timeout)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
