"""The coordinator's loop: one process, one ROUTER socket, one thread.

It receives a message, hands it to the state object whose job it is (membership, rounds,
leases, barriers, the registry, the status board), and sends what that decided; between
messages it runs the timers (periodic checkpoints, round deadlines, liveness, barrier
deadlines, stats requests). The rules live in the state objects, each unit-tested without a
socket; this module is the plumbing between them and the wire.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paramserver.config import CheckpointPolicy, Limits, Timeouts, limits_from_env
from paramserver.coordinator.barriers import Barriers
from paramserver.coordinator.collector import STATS_TIMEOUT, StatsCollector
from paramserver.coordinator.completion import Completion
from paramserver.coordinator.journal import (
    COMPACT_BYTES,
    Journal,
    replay,
    scaling_record,
    state_records,
)
from paramserver.coordinator.leases import Leases
from paramserver.coordinator.membership import ALIVE, Member, Membership
from paramserver.coordinator.rebuild import Rebuilds
from paramserver.coordinator.refusal import Refusal
from paramserver.coordinator.registry import TableRegistry
from paramserver.coordinator.rounds import CheckpointRounds, Round
from paramserver.coordinator.scaling import Scaling
from paramserver.coordinator.status import StatusBoard
from paramserver.errors import ConfigError, ProtocolError
from paramserver.metrics import serve_prometheus
from paramserver.wire import protocol
from paramserver.wire.messages import (
    VIEW_NUMBER,
    AcquireLeaseMsg,
    BarrierMsg,
    CompleteLeaseMsg,
    CreateTableMsg,
    ErrorMsg,
    GetViewMsg,
    HeartbeatMsg,
    LeaveMsg,
    ListTablesMsg,
    MoveDoneMsg,
    PingMsg,
    RegisterMsg,
    ReplyMsg,
    SaveMsg,
    ShutdownMsg,
    StatusMsg,
)
from paramserver.wire.transport import Endpoint, Router, Security, new_context

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)

MAX_WAITING_SAVES = 16  # saves asked while a round runs, kept to start after it


class Coordinator:
    """The coordinator's state and loop.

    Example:
        coord = Coordinator(num_servers=2, num_workers=1)
        threading.Thread(target=coord.serve).start(); ...; coord.stop()
    """

    def __init__(
        self,
        num_servers: int,
        num_workers: int,
        host: str = "127.0.0.1",
        port: int = 0,
        timeouts: Timeouts | None = None,
        restore: str | None = None,
        checkpoints: CheckpointPolicy | None = None,
        security: Security | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        listen_fd: int | None = None,
        limits: Limits | None = None,
        exit_when_done: float | None = None,
        journal: str | None = None,
        replication: int = 1,
        journal_sync: bool = True,
        journal_bytes: int = COMPACT_BYTES,
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.members = Membership(num_servers, num_workers, self.timeouts, replication=replication)
        # not given: the PS_LIMIT_* variables its launcher set, else the defaults
        limits = limits if limits is not None else limits_from_env()
        self.tables = TableRegistry(
            [m.rank for m in self.members.servers], limits, replication=replication
        )
        if restore is not None:  # read before binding: a bad checkpoint leaves no socket
            self.members.restore = self.tables.restore(restore)
            self.members.start_clock = self.members.restore["clock"]
        now = time.monotonic()
        self.rounds = CheckpointRounds(checkpoints, now, latest=self.members.restore)
        self.leases = Leases(limits)
        self.barriers = Barriers(limits)
        self.board = StatusBoard(now)
        # with exit_when_done (a dead worker's restart grace, s): end the job once it is done
        self.completion = None if exit_when_done is None else Completion(self, exit_when_done)
        self.scaling = Scaling(self)  # servers joining and draining while training
        self.rebuilds = Rebuilds(self)  # replicas rebuilt from live copies
        # this process's number: a member that sees it change knows the coordinator restarted
        self.boot = secrets.randbits(62) + 1
        self.journal = (
            Journal(journal, journal_bytes, sync=journal_sync) if journal is not None else None
        )
        self._rebuild_next: int | None = None  # a rebuild the journal left to announce
        if self.journal is not None:
            self.members.supervised = True
            self._rebuild_next = replay(self, self.journal.replay(), now)
        self._saves: list[tuple[bytes, SaveMsg]] = []  # saves asked while a round ran
        self._rejections = protocol.Rejections()
        self._stop = threading.Event()
        self.ctx = new_context()
        try:
            self.router = Router(
                self.ctx,
                host,
                port,
                security,
                listen_fd,
                liveness=(self.timeouts.heartbeat_interval, self.timeouts.heartbeat_timeout),
            )
        except BaseException:  # e.g. the address is in use: leave no context behind
            self.ctx.term()
            raise
        self.address = self.router.address
        endpoint = Endpoint(self.ctx, request_timeout=STATS_TIMEOUT, security=security)
        self.collector = StatsCollector(endpoint, self.board)
        # the newest status, rebuilt by the loop and replaced whole: the Prometheus exporter's
        # thread reads it without a lock
        self.snapshot: dict[str, Any] | None = None
        self._snapshot_view = -1  # the view number the snapshot was built at
        self._stop_metrics: Callable[[], None] | None = None
        if metrics_port is not None:
            try:
                self._stop_metrics = serve_prometheus(
                    lambda: self.snapshot, metrics_port, metrics_host
                )
            except BaseException:
                self.router.close()
                self.ctx.term()
                raise
            log.info("metrics served at http://%s:%d/metrics", metrics_host, metrics_port)
        self._handlers: dict[str, Callable[[bytes, Any], None]] = {
            "register": self._on_register,
            "heartbeat": self._on_heartbeat,
            "leave": self._on_leave,
            "get_view": self._on_get_view,
            "create_table": self._on_create_table,
            "list_tables": self._on_list_tables,
            "barrier": self._on_barrier,
            "acquire_lease": self._on_acquire_lease,
            "complete_lease": self._on_complete_lease,
            "save": self._on_save,
            "reply": self._on_reply,
            "error": self._on_error,
            "status": self._on_status,
            "shutdown": self._on_shutdown,
            "ping": self._on_ping,
            "drain": self.scaling.on_drain,
            "move_done": self._on_move_done,
        }

    # ---- the loop -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Run until :meth:`stop` or a ``shutdown`` request."""
        log.info(
            "coordinator bound at %s, expecting %d servers and %d workers",
            self.address,
            len(self.members.servers),
            len(self.members.workers),
        )
        poller = self.router.poller()
        self._resume()
        try:
            while not self._stop.is_set():
                if poller.poll(100):
                    for _ in range(1000):
                        try:
                            identity, frames = self.router.recv_raw_nowait()
                        except BlockingIOError:
                            break
                        self._handle(identity, frames)
                    self.members.links_dropped(self.router.dropped())
                self._check_deadlines(time.monotonic())
                # the exporter's status: anew every collector round, and at once when the
                # membership changed (a node joined, died or left)
                polled = self.collector.poll(time.monotonic(), self.members.servers)
                if polled or self.members.view_number != self._snapshot_view:
                    self._snapshot_view = self.members.view_number
                    self.snapshot = self.status()
        finally:
            if self._stop_metrics is not None:
                self._stop_metrics()
            self.collector.close()
            self.router.close()
            self.ctx.term()
            if self.journal is not None:
                self.journal.close()
            log.info("coordinator stopped")

    def _handle(self, identity: bytes, frames: list[Any]) -> None:
        try:
            self._dispatch(identity, frames)
        except Exception:  # a bug in an answer's path: logged at a bounded rate, never fatal
            if self._rejections.count():
                log.exception("coordinator: a message could not be handled")

    def _dispatch(self, identity: bytes, frames: list[Any]) -> None:
        try:
            header, _ = protocol.decode(frames)
        except ProtocolError as exc:
            if self._rejections.count():
                log.warning(
                    "coordinator: malformed message dropped (%d so far): %s",
                    self._rejections.total,
                    exc,
                )
            self.router.error(identity, 0, "protocol", f"coordinator: {exc}")
            return
        kind, rid = header["kind"], header["id"]
        handler = self._handlers.get(kind)
        if handler is None:
            self.router.error(
                identity, rid, "bad_request", f"the coordinator does not take {kind!r}"
            )
            return
        try:
            handler(identity, header)
        except Refusal as exc:
            self.router.error(identity, rid, exc.code, exc.message)
        except ConfigError as exc:
            self.router.error(identity, rid, "invalid", str(exc))
        except Exception as exc:  # a bug must not take the coordinator down with it
            if self._rejections.count():
                log.exception("coordinator: %s request %d failed", kind, rid)
            self.router.error(identity, rid, "internal", f"{type(exc).__name__}: {exc}"[:4096])

    def _check_deadlines(self, now: float) -> None:
        self._periodic_checkpoint(now)
        for rnd, why in self.rounds.expired(now):
            self._fail_round(rnd, why)
        for m, why in self.members.expired(now):
            self._declare_dead(m, why)
        for waiters, why in self.barriers.expired(now, self.members.expected_at_barriers()):
            for identity, rid in waiters:
                self.router.error(identity, rid, "timeout", why)
        if self.completion is not None:
            self.completion.tick(now)

    # ---- membership -----------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return self.members.view()

    def _record(self, record: dict[str, Any]) -> None:
        if self.journal is not None:
            self.journal.append(record)
            if self.journal.needs_compaction():
                self.compact_journal()

    def compact_journal(self) -> None:
        """Rewrite the journal as the current state (see journal.py); nothing without one."""
        if self.journal is not None:
            self.journal.compact(state_records(self))

    def journal_scaling(self) -> None:
        """Journal where the moves and rebuilds stand (a restart resumes them)."""
        self._record(scaling_record(self))

    def journal_moved(self, names: list[str]) -> None:
        """Journal the dense tables a move placed anew (replayed with their ranges)."""
        for name in names:
            self._record({"t": "table", "spec": self.tables.tables[name].to_wire()})

    def _resume(self) -> None:
        """A restarted coordinator's first turn: announce the next queued move or rebuild
        that the journal left waiting (members that miss the view ask for it: they see its
        number in their heartbeats' answers)."""
        self.scaling.start()
        if self._rebuild_next is not None:
            self.rebuilds.start(self._rebuild_next)
            self._rebuild_next = None

    def publish(self, reason: str) -> None:
        """Send every live member the next view (``reason`` is logged)."""
        self._publish(reason)

    def _publish(self, reason: str) -> None:
        view, identities = self.members.publish(reason)
        self._record(self.members.to_record())
        for identity in identities:
            self.router.send(identity, {"kind": "view", "id": 0, "view": view})

    def _declare_dead(self, m: Member, why: str) -> None:
        self.members.mark_dead(m, why)
        self.rebuilds.on_dead(m)
        self.scaling.on_dead(m)
        if m.role == "worker":
            self.leases.requeue(m.rank, m.name)
            self._record({"t": "lease", "op": "requeue", "rank": m.rank, "name": m.name})
        else:  # a round waiting for it would block every later checkpoint until its timeout
            for rnd in self.rounds.server_lost(m.rank):
                self._fail_round(rnd, f"{m.name} died before it wrote its shards")
        self._publish(f"{m.name} declared dead")
        self._check_barriers()
        self.scaling.start()  # an abandoned move queued again, if it can start

    def _on_register(self, identity: bytes, h: RegisterMsg) -> None:
        if h["role"] == "server":
            self._register_server(identity, h)
        else:
            self.members.wait(identity, h, time.monotonic())
            self._admit_workers()

    def _register_server(self, identity: bytes, h: RegisterMsg) -> None:
        now = time.monotonic()
        old = self.members.superseded(h, now)
        if old is not None:
            self._declare_dead(old, "its process is gone and a replacement is here")
        m, replacing = self.members.register_server(identity, h, now)
        view = self.members.view_for(m)
        tables = None
        if replacing:
            # a replacement: it creates every table and loads its keys from the newest
            # checkpoint, if any (updates since that checkpoint are lost on this server)
            view.pop("restore", None)
            if self.rounds.latest is not None:
                view["restore"] = self.rounds.latest
            tables = self.tables.to_wire()
        elif self.members.restore or m.rank not in self.members.ring:
            tables = self.tables.to_wire()  # a joining server: every table, empty
        self.router.reply(identity, h["id"], rank=m.rank, view=view, tables=tables)
        self._publish(
            f"{m.name} {'replaced' if replacing else 'registered'} at {m.address}"
            + (f" (restoring {view['restore']['path']})" if replacing and "restore" in view else "")
        )
        if m.rank not in self.members.ring:
            self.scaling.join(m.rank)
        elif m.rebuilding:
            self.rebuilds.start(m.rank)
        self.scaling.start()  # a move that waited for this rank's replacement
        self._admit_workers()

    def _on_move_done(self, identity: bytes, h: MoveDoneMsg) -> None:
        if h.get("purpose") == "rebuild":
            self.rebuilds.on_done(identity, h)
        else:
            self.scaling.on_move_done(identity, h)

    def _admit_workers(self) -> None:
        for identity, h, _ in self.members.admissible():
            try:
                m, view, rejoin = self.members.admit_worker(identity, h, time.monotonic())
            except Refusal as exc:  # this waiting worker is refused, not the current sender
                self.router.error(identity, h["id"], exc.code, exc.message)
                continue
            self.router.reply(identity, h["id"], rank=m.rank, view=view)
            self._publish(
                f"{m.name} "
                + (f"rejoined at clock {view['start_clock']}" if rejoin else "registered")
            )

    def _on_heartbeat(self, identity: bytes, h: HeartbeatMsg) -> None:
        m = self.members.heartbeat(h, time.monotonic(), self.router.last_fd)
        if h.get("examples") is not None:
            self.board.record_examples(m.rank, m.last_seen, m.examples)
        self.router.reply(
            identity, h["id"], view={VIEW_NUMBER: self.members.view_number, "boot": self.boot}
        )

    def _on_leave(self, identity: bytes, h: LeaveMsg) -> None:
        m = self.members.leave(h)
        if m is not None:
            self.leases.requeue(m.rank, m.name)
            self._record({"t": "lease", "op": "requeue", "rank": m.rank, "name": m.name})
            self._publish(f"{m.name} left")
            self._check_barriers()
        self.router.reply(identity, h["id"])

    def _on_get_view(self, identity: bytes, h: GetViewMsg) -> None:
        self.router.reply(identity, h["id"], view=self.members.view())

    # ---- checkpoints ----------------------------------------------------------------------

    def _on_save(self, identity: bytes, h: SaveMsg) -> None:
        # a periodic round makes way for a worker's save (it would wait for clocks that the
        # worker, waiting for its save, does not move); another worker's save is waited for
        if self.rounds.rounds and not self.rounds.make_way():
            if len(self._saves) >= MAX_WAITING_SAVES:
                raise Refusal(
                    "checkpoint",
                    f"{len(self._saves)} checkpoints already wait for the one being written; "
                    "try again when they are done",
                )
            self._saves.append((identity, h))
            return
        rnd = self.rounds.start(
            Path(h["path"]),
            h["clock"],
            h["timeout"],
            (identity, h["id"]),
            self.members.writers(),
            time.monotonic(),
        )
        self._ask_to_write(rnd)

    def _periodic_checkpoint(self, now: float) -> None:
        if self._saves:
            return  # the saves that waited go first
        workers_alive = any(w.state == ALIVE for w in self.members.workers)
        rnd = self.rounds.start_periodic(now, self.members.writers(), workers_alive)
        if rnd is not None:
            self._ask_to_write(rnd)

    def _ask_to_write(self, rnd: Round) -> None:
        for rank in sorted(rnd.waiting):
            self.router.send(
                self.members.servers[rank].identity,
                {
                    "kind": "checkpoint",
                    "id": rnd.round_id,
                    "path": str(rnd.partial),
                    "clock": rnd.clock,
                },
            )

    def _on_reply(self, identity: bytes, h: ReplyMsg) -> None:
        m = self.members.server_by_identity(identity)
        rnd = self.rounds.answered(h["id"], m.rank) if m is not None else None
        if rnd is not None:
            self._finish_round(rnd)

    def _on_error(self, identity: bytes, h: ErrorMsg) -> None:
        m = self.members.server_by_identity(identity)
        if m is None:
            return  # not a server's answer: no round hears it
        rnd = self.rounds.refused(h["id"], h["code"], h["message"], m.rank)
        if rnd is not None:
            self._fail_round(rnd, "; ".join(rnd.errors) or h["message"])
        else:
            self._next_save()  # a periodic round dropped to retry: a waiting save goes first

    def _finish_round(self, rnd: Round) -> None:
        if rnd.errors:  # every server answered, and some failed: say which, in their words
            self._fail_round(rnd, "; ".join(rnd.errors))
            return
        try:
            final = self.rounds.commit(
                rnd,
                tables=self.tables.specs(),
                num_servers=len(self.members.servers),
                num_workers=len(self.members.workers),
                servers=[m.rank for m in self.members.writers()],
            )
        except OSError as exc:
            self._fail_round(rnd, f"writing the manifest failed: {exc}")
            return
        self._record({"t": "checkpoint", "latest": self.rounds.latest})
        if rnd.requester is not None:
            self.router.reply(rnd.requester[0], rnd.requester[1], path=str(final))
        self._next_save()

    def _fail_round(self, rnd: Round, reason: str) -> None:
        self.rounds.fail(rnd, reason)
        if rnd.requester is not None:
            self.router.error(
                rnd.requester[0],
                rnd.requester[1],
                "checkpoint",
                f"checkpoint at clock {rnd.clock} failed: {reason}",
            )
        self._next_save()

    def _next_save(self) -> None:
        """Start the save that waited for the round just ended, if any."""
        while self._saves and not self.rounds.rounds:
            identity, h = self._saves.pop(0)
            try:
                self._on_save(identity, h)
            except Refusal as exc:
                self.router.error(identity, h["id"], exc.code, exc.message)

    # ---- tables, barriers, leases ---------------------------------------------------------

    def _on_create_table(self, identity: bytes, h: CreateTableMsg) -> None:
        spec = self.tables.create(h["spec"]).to_wire()
        self._record({"t": "table", "spec": spec})
        # the servers create a table only when the coordinator says so; sent before the
        # answer, so that the worker's own create_shard finds it there
        for m in self.members.servers:
            if m.state == ALIVE and m.identity:
                self.router.send(m.identity, {"kind": "create_shard", "id": 0, "spec": spec})
        self.router.reply(identity, h["id"], spec=spec)

    def _on_list_tables(self, identity: bytes, h: ListTablesMsg) -> None:
        self.router.reply(identity, h["id"], tables=self.tables.to_wire())

    def _check_sender(self, identity: bytes, rank: int) -> None:
        """Refuse a message naming worker ``rank`` unless it comes from the connection that
        registered that rank: no peer waits at a barrier or takes a lease in another's name."""
        m = self.members.member("worker", rank)
        if m is None or not m.identity or m.identity != identity:
            raise Refusal(
                "identity",
                f"worker[{rank}] is not registered from this connection: a message naming "
                "another worker's rank is refused and nothing changed",
            )

    def _on_barrier(self, identity: bytes, h: BarrierMsg) -> None:
        self._check_sender(identity, h["rank"])
        deadline = time.monotonic() + h["timeout"]
        self.barriers.arrive(h["name"], h["rank"], (identity, h["id"]), deadline)
        self._check_barriers()

    def _check_barriers(self) -> None:
        for waiters in self.barriers.complete(self.members.expected_at_barriers()):
            for identity, rid in waiters:
                self.router.reply(identity, rid)

    def _on_acquire_lease(self, identity: bytes, h: AcquireLeaseMsg) -> None:
        self._check_sender(identity, h["rank"])
        shard = self.leases.acquire(h)
        self._record({"t": "lease", "op": "acquire", "h": dict(h)})
        self.router.reply(identity, h["id"], shard=shard)

    def _on_complete_lease(self, identity: bytes, h: CompleteLeaseMsg) -> None:
        self._check_sender(identity, h["rank"])
        self.leases.complete(h)
        self._record({"t": "lease", "op": "complete", "h": dict(h)})
        self.router.reply(identity, h["id"])

    # ---- shutdown and status --------------------------------------------------------------

    def _on_shutdown(self, identity: bytes, h: ShutdownMsg) -> None:
        servers = self.members.servers
        log.info("shutdown requested: stopping %d servers", sum(m.state == ALIVE for m in servers))
        for m in servers:
            if m.state == ALIVE and m.identity:
                self.router.send(m.identity, {"kind": "stop", "id": 0})
        self.router.reply(identity, h["id"])
        self._stop.set()

    def _on_ping(self, identity: bytes, h: PingMsg) -> None:
        self.router.reply(identity, h["id"])

    def status(self) -> dict[str, Any]:
        """The cluster's state as one plain map: nodes, workers' clocks and examples/s, tables
        per server, servers' traffic, staleness, the last checkpoint (see paramserver.metrics).

        Example:
            print(paramserver.metrics.format_status(coord.status()))
        """
        status = self.board.status(
            now=time.monotonic(),
            address=self.address,
            view_number=self.members.view_number,
            servers=self.members.servers,
            workers=self.members.workers,
            tables=self.tables.specs(),
            last_checkpoint=self.rounds.last_written,
        )
        status["rebuilds"] = list(self.rebuilds.done)
        status["moves"] = list(self.scaling.moves)  # servers joined and drained: time, bytes
        return status

    def _on_status(self, identity: bytes, h: StatusMsg) -> None:
        self.router.reply(identity, h["id"], status=self.status())
