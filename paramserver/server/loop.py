"""A server's event loop: poll, decode, dispatch to a handler, answer.

One thread owns every shard (no locks around tables): it receives requests on its ROUTER
(``wire.poller.Poller``, ``wire.paths.Paths``), hands each to its handler (``pull.py``,
``push.py``, ``admin.py``) and answers a refusal with an error reply; between messages it takes
the coordinator's views and orders (``cluster.py``) and expires the pulls that waited too long.
Heartbeats run on their own thread and socket. The server never dies of a bad request.
"""

from __future__ import annotations

import contextlib
import logging
import socket as pysocket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from paramserver.config import Limits, Timeouts, limits_from_env
from paramserver.errors import ConfigError, ProtocolError
from paramserver.server.admin import Admin
from paramserver.server.ahead import PULLS, refuse_ahead
from paramserver.server.assign import Assigns
from paramserver.server.cluster import CoordinatorLink
from paramserver.server.many import Many
from paramserver.server.process import (
    TRIM_AFTER_BYTES,
    trim_allocator,
    tune_allocator,
    warm_kernels,
)
from paramserver.server.pull import Pulls
from paramserver.server.push import Pushes
from paramserver.server.rebuild import Rebuilds
from paramserver.server.snapshot import Snapshots
from paramserver.server.state import ServerState
from paramserver.server.transfer import Transfers
from paramserver.wire import protocol
from paramserver.wire.paths import Behind, Paths, Request
from paramserver.wire.poller import Poller
from paramserver.wire.refusal import Refusal
from paramserver.wire.transport import Router, Security, new_context

__all__ = ["Server", "run_server", "tune_allocator", "warm_kernels"]

log = logging.getLogger(__name__)

VIEW_WAIT = 1.0  # seconds a message of a worker not yet live waits for the view that admits it
TABLE_WAIT = 5.0  # seconds a worker's create_shard waits for the coordinator's order
MAX_PARKED = 1024  # messages waiting so at once (more are refused at once)
# messages of one worker waiting behind its push whose bulk payload is on its way, and their
# bytes (one message always may)
MAX_BEHIND = 1024
MAX_BEHIND_BYTES = 1 << 30


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
        limits: Limits | None = None,
    ) -> None:
        self.wanted_rank = rank
        self.timeouts = timeouts or Timeouts()
        self.ctx = new_context()
        try:
            self.router = Router(self.ctx, host, port, security)
        except BaseException:  # e.g. the address is in use: leave no context behind
            self.ctx.term()
            raise
        self.paths = Paths.bind(
            self.router,
            host,
            idle=self.timeouts.heartbeat_timeout,
            secret=None if security is None else security.server_secret,
        )
        # not given: the PS_LIMIT_* variables its launcher set, else the defaults
        self.state = ServerState(limits if limits is not None else limits_from_env())
        self.state.address = self.router.address
        if advertise or host in ("0.0.0.0", "*"):
            self.state.address = f"tcp://{advertise or pysocket.gethostname()}:{self.router.port}"
        self.address = self.state.address
        self._stop = threading.Event()
        self.rejections = protocol.Rejections()
        # messages of workers not yet live, waiting for a view: (identity, frames, since)
        self.parked: list[tuple[bytes, list[Any], float]] = []
        # the connections with a request parked for a move (``held_for_move``): their later
        # requests wait behind it until it is handled again
        self.move_held: set[bytes] = set()
        # the view, tables, moves received and tenth of a second last tried at
        self.parked_state = (0, 0, 0, 0)
        self.snapshots = Snapshots(self.state)
        self.cluster = CoordinatorLink(
            self.ctx,
            coordinator,
            self.state,
            self.paths,
            self.snapshots,
            self.timeouts,
            security,
            progress=self.progress,
            stop=self._stop,
        )
        self.pulls = Pulls(self.state, self.progress)
        self.pushes = Pushes(self.state, self.paths, self.progress)
        admin = Admin(self.state, self.paths, self.progress)
        many = Many(self.state, self.paths, self.pushes, self.progress)
        assigns = Assigns(self.state, self.paths, self.progress)
        self.cluster.create = admin.create
        self.transfers = Transfers(
            self.state,
            self.ctx,
            security,
            self.progress,
            self.cluster.report,
            self.timeouts.request,
        )
        self.rebuilds = Rebuilds(self.state, self.transfers.endpoint, self.progress,
                                 self.pushes.apply_sync, self.cluster.report)  # fmt: skip
        self.cluster.on_view = self.on_view
        self.transfers.notify = self.tell_worker
        self.handlers: dict[str, Callable[[Any, Request], None]] = {
            "pull": self.pulls.on_pull,
            "push": self.pushes.on_push,
            "pull_many": many.on_pull,
            "push_many": many.on_push,
            "clock": admin.on_clock,
            "switched": self.on_switched,
            "transfer": self.on_transfer,
            "create_shard": admin.on_create_shard,
            "set_lr": admin.on_set_lr,
            "stats": admin.on_stats,
            "ping": admin.on_ping,
            "open_bulk": admin.on_open_bulk,
            "attach": admin.on_attach,
            "attach_slot": admin.on_attach_slot,
            "assign": assigns.on_assign,
            "restore": assigns.on_restore,
        }

    @property
    def rank(self) -> int:
        return self.state.rank

    @property
    def name(self) -> str:
        return self.state.name

    # ---- life -----------------------------------------------------------------------------

    def register(self) -> None:
        """Register with the coordinator and learn this server's rank and the view."""
        self.cluster.register(self.wanted_rank)

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Register (if not yet) and run the loop until stopped."""
        try:
            if self.state.rank < 0:
                self.register()
            poller = Poller(self.router, self.paths.channel)
            deferred = self.state.deferred
            while not self._stop.is_set():
                wait_ms = 100
                soonest = deferred.next_deadline()
                if soonest is not None:
                    wait_ms = max(0, min(wait_ms, int((soonest - time.monotonic()) * 1000) + 1))
                if self.parked:  # the coordinator's views do not wake this poll
                    wait_ms = min(wait_ms, 10)
                if poller.poll(wait_ms):
                    for _ in range(256):
                        try:
                            identity, frames = self.router.recv_raw_nowait()
                        except BlockingIOError:
                            break
                        self.handle_safely(identity, frames)
                elif self.paths.received >= TRIM_AFTER_BYTES:
                    # idle for a whole poll after large messages: hand the allocator's free
                    # memory back and the receive buffers too (12 MiB after pushes of 200k x 16
                    # float32); the next burst allocates them once again
                    self.paths.trim()
                    trim_allocator()
                if self.paths.waiting:  # pushes whose payload came in, or is given up
                    self.resume()
                self.cluster.poll(0)
                self.transfers.tick()
                self.rebuilds.tick()
                self.cluster.watch_coordinator()
                self.cluster.catch_up()
                self.unpark()
                if len(deferred):
                    self.pulls.expire(time.monotonic())
                self.paths.expire(time.monotonic())
        finally:
            self.close()

    def close(self) -> None:
        self.cluster.stop_heartbeat()
        self.paths.close()
        self.transfers.close()
        self.cluster.close()
        self.router.close()
        self.ctx.term()
        log.info("%s stopped", self.state.name)

    # ---- dispatch -------------------------------------------------------------------------

    def handle(self, identity: bytes, frames: list[Any], since: float | None = None) -> None:
        """Decode one message, run its handler, and answer what the handler refused
        (``since``: when a message that waited for a view first came). A message of a worker
        whose push's payload is still on the bulk channel waits behind that push."""
        if identity in self.paths.waiting:
            self.hold(identity, frames, since)
            return
        try:
            req = self.paths.receive(identity, frames)
        except ProtocolError as exc:
            if self.rejections.count():
                log.warning(
                    "%s: malformed message dropped (%d so far): %s",
                    self.state.name,
                    self.rejections.total,
                    exc,
                )
            self.router.error(identity, exc.request_id, exc.code, f"{self.state.name}: {exc}")
            return
        ready = False
        with self.answering(req):
            if req.header["kind"] in ("pull", "push", "assign"):  # first: the cheapest refusal
                self.state.check_size(req.header, req.arrays)
            # a payload behind the header is taken first of all; one still on its way is
            # waited for aside (resume), never here
            ready = not self.park(identity, frames, req.header, since) and self.paths.fetch(req)
        if ready and not self.held_for_move(identity, frames, since, req):
            self.dispatch(req)

    def held_for_move(
        self, identity: bytes, frames: list[Any], since: float | None, req: Request
    ) -> bool:
        """Whether a request for keys this server is receiving was kept (or refused) until
        the move's end (server/transfer.py); a request in a newer view applies that view first
        (it may announce the move)."""
        if since is None and identity in self.move_held and len(self.parked) < MAX_PARKED:
            # behind a request of its sender held for a move that just ended (its end came
            # earlier in this batch): handled after it, in the order sent, not before (a push
            # applied before an earlier one would make that one look like a retry)
            self.parked.append((identity, frames, time.monotonic()))
            return True
        wanted = req.header.get("view")
        newer = isinstance(wanted, int) and wanted > self.state.view
        if self.transfers.incoming is None and not self.rebuilds.busy and not newer:
            return False
        done = True
        with self.answering(req):
            self.cluster.admit(req.header)  # fencing, and the view of the move
            if self.rebuilds.holds(req.header, since):
                try:
                    self.hold_for_move(identity, frames, since)
                except Refusal:
                    self.rebuilds.dropped()  # this rebuild can no longer be whole
                    raise
                if since is None and req.header["kind"] in EARLY:
                    # held whole here until the rebuild's end, and read by no one before: the
                    # worker goes on (a second answer, after, is dropped as late)
                    req.reply.ok()
            elif self.transfers.holds(req.header, req.arrays):
                self.hold_for_move(identity, frames, since)
                self.move_held.add(identity)
            else:
                done = False
        return done

    def dispatch(self, req: Request) -> None:
        """Run a decoded request's handler (its bulk payload, if any, is in)."""
        kind = req.header["kind"]
        rank = req.header.get("rank")
        with self.answering(req):
            self.cluster.admit(req.header)  # a replaced process serves nothing (fencing)
            if rank is not None:  # every server request naming a rank is a worker's
                self.state.claim(rank, req.identity)
            if kind in PULLS and self.transfers.out is not None:  # ran ahead of a move?
                refuse_ahead(self.transfers.out, self.state, req.header, self.transfers.notify)
            handler = self.handlers.get(kind)
            if handler is None:
                raise Refusal("bad_request", f"a server does not take {kind!r} messages")
            started = time.perf_counter()
            handler(req.header, req)
            self.state.metrics.observe_request(kind, time.perf_counter() - started)

    @contextlib.contextmanager
    def answering(self, req: Request) -> Iterator[None]:
        """Answer what the block refuses, and any bug in it with an ``internal`` error."""
        try:
            yield
        except (Refusal, ConfigError) as exc:
            req.reply.refuse(exc)
        except Exception as exc:  # a bug must not take the server down with it
            if self.rejections.count():
                log.exception(
                    "%s: %s request %d failed",
                    self.state.name,
                    req.header["kind"],
                    req.header["id"],
                )
            req.reply.error("internal", f"{type(exc).__name__}: {str(exc)[:1000]}")

    def hold(self, identity: bytes, frames: list[Any], since: float | None) -> None:
        """Keep a message behind its sender's push whose payload is still on its way: a
        worker's requests are handled in the order it sent them (a pull sees its own push)."""
        behind = self.paths.behind.setdefault(identity, Behind())
        size = sum(memoryview(f).nbytes for f in frames)
        many = len(behind.messages) >= MAX_BEHIND
        if not behind.messages or not (many or behind.nbytes + size > MAX_BEHIND_BYTES):
            behind.add(frames, since)
            return
        try:
            req = self.paths.receive(identity, frames)
        except ProtocolError:
            return  # malformed: it would have been refused without an answer it can use
        req.reply.error(
            "busy",
            f"{self.state.name}: {len(behind.messages)} requests of this worker "
            f"({behind.nbytes} bytes) already wait behind its push whose payload is still on "
            f"the bulk channel (at most {MAX_BEHIND} and {MAX_BEHIND_BYTES} bytes): this one "
            "was not handled and changed nothing (wait for replies before sending more)",
        )

    def resume(self) -> None:
        """Handle the pushes whose payload came in (refuse those given up: too slow, silent,
        or their connection broke), then what their senders sent behind them, in order."""
        for req, refusal in self.paths.arrived():
            try:
                if refusal is None:
                    self.dispatch(req)
                else:
                    req.reply.refuse(refusal)
            except Exception:  # a bug in a reply's path: logged, never the loop's end
                if self.rejections.count():
                    log.exception("%s: a push could not be answered", self.state.name)
            self.paths.settled(req)
            behind = self.paths.behind.get(req.identity)
            while behind and behind.messages and req.identity not in self.paths.waiting:
                frames, since = behind.next()
                self.handle_safely(req.identity, frames, since)
            if behind and not behind.messages:
                self.paths.behind.pop(req.identity, None)

    def handle_safely(self, identity: bytes, frames: list[Any], since: float | None = None) -> None:
        """:meth:`handle`, and whatever escapes it (a bug in a reply's path) is logged, at a
        bounded rate, and never ends the loop."""
        try:
            self.handle(identity, frames, since)
        except Exception:
            if self.rejections.count():
                log.exception("%s: a message could not be handled", self.state.name)

    def park(
        self, identity: bytes, frames: list[Any], h: dict[str, Any], since: float | None
    ) -> bool:
        """Keep a request of a worker that has not registered yet for up to a second: a
        (restarted) worker may be faster than the view that lets it in. The message waits
        here, and the loop serves everyone else meanwhile (``unpark``); a push whose payload
        follows on the bulk channel is not kept (its payload would fill the channel's memory)."""
        limit = self.may_wait(h)
        now = time.monotonic()
        first = now if since is None else since
        if now - first >= limit or len(self.parked) >= MAX_PARKED:
            return False  # refused (not registered, no such table)
        self.parked.append((identity, frames, first))
        return True

    def hold_for_move(self, identity: bytes, frames: list[Any], since: float | None) -> None:
        """Keep a request for keys this server is receiving until the move's end came (the
        loop handles it again then: ``unpark``); refused once it waited the request timeout."""
        now = time.monotonic()
        first = now if since is None else since
        if now - first >= self.timeouts.request or len(self.parked) >= MAX_PARKED:
            raise Refusal(
                "moving",
                f"{self.state.name}: the keys of this request are still moving here after "
                f"{now - first:.3g}s (a source of the move did not finish); nothing changed",
            )
        self.parked.append((identity, frames, first))

    def tell_worker(self, rank: int, view: dict[str, Any]) -> None:
        """Send worker ``rank`` a view, on the connection its requests came by (none yet: it
        has sent this server nothing, so nothing it waits for here can be early)."""
        identity = self.state.owners.get(rank)
        if identity is not None:
            self.router.send(identity, {"kind": "view", "id": 0, "view": view})

    def on_switched(self, h: Any, req: Request) -> None:
        """A worker routes by a move's new ring from now on (server/transfer.py)."""
        if h.get("purpose") == "rebuild":  # first: the clock step may take the final
            self.rebuilds.on_switched(h["rank"], h["move"], h["clock"])
        if self.state.clocks.advance(h["rank"], h["clock"]):
            self.progress()
        if h.get("purpose") != "rebuild":
            # since: the first clock it reads by the new ring (older workers: the next one)
            self.transfers.on_switched(h["rank"], h["move"], h.get("since", h["clock"] + 1))
        req.reply.ok()

    def on_view(self, view: dict[str, Any]) -> None:
        self.transfers.on_view(view)
        self.rebuilds.on_view(view)

    def on_transfer(self, h: Any, req: Request) -> None:
        """Rows of a move (server/transfer.py) or of a rebuild (server/rebuild.py)."""
        if h.get("purpose") == "rebuild":
            self.rebuilds.on_transfer(h, req)
        else:
            self.transfers.on_transfer(h, req)

    def may_wait(self, h: dict[str, Any]) -> float:
        """How long a message may wait for the coordinator (0: not at all): a request of a
        worker not registered yet (a view), a worker's create_shard of a table the coordinator has
        not yet ordered here."""
        kind, state = h["kind"], self.state
        if "rank" in h and "bulk" not in h:
            return VIEW_WAIT if h["rank"] not in state.registered else 0.0
        if kind == "create_shard":
            name = h["spec"].get("name")
            if isinstance(name, str) and name not in state.tables:
                return TABLE_WAIT if name not in state.refused_tables else 0.0
        return 0.0

    def unpark(self) -> None:
        """Handle again the messages that waited for a view: a view came, or their second is
        over (they are then refused as not live)."""
        if not self.parked:
            return
        now = time.monotonic()
        # (a move received: the requests held for it go on at once, not at the next tenth)
        now_state = (
            self.state.view,
            len(self.state.tables),
            self.transfers.received,
            int(now * 10),
        )
        if now_state == self.parked_state:
            return
        self.parked_state = now_state
        waiting, self.parked = self.parked, []
        self.move_held = set()  # (a request held again puts its sender back)
        for identity, frames, since in waiting:
            self.handle_safely(identity, frames, since)
        self.rebuilds.unparked()

    def progress(self) -> None:
        """The slowest live worker may have moved: apply the sync clocks it completed (taking
        a pending checkpoint exactly at its clock boundary), then answer the deferred pulls
        that became ready."""
        low = self.state.clocks.min_clock
        due = self.snapshots.due(self.state.clocks.reached)
        if due is not None:
            self.pushes.apply_sync(due)
            self.cluster.send(self.snapshots.write())
        rebuild = self.rebuilds.due(low)
        if rebuild is not None:  # a rebuild's final: the state at exactly that clock
            self.pushes.apply_sync(rebuild)
            self.rebuilds.finish()
        self.pushes.apply_sync(low)
        self.pulls.release()


# requests a server being rebuilt answers as soon as it holds them (server/rebuild.py)
EARLY = frozenset({"push", "push_many", "clock", "switched"})


def run_server(
    coordinator: str, host: str = "127.0.0.1", port: int = 0, timeouts: Timeouts | None = None
) -> None:
    """Start a server and serve until stopped (SIGTERM/SIGINT handled by the caller)."""
    Server(coordinator, host, port, timeouts).serve()
