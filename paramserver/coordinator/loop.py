"""The coordinator: membership, heartbeats, the cluster view, barriers, the table registry and
data leases.

One process, one ROUTER socket, one single-threaded loop. Servers and workers register and get
ranks; the coordinator publishes a *view* (epoch, members and their states) to every member
whenever it changes; a member whose heartbeats stop for ``heartbeat_timeout`` seconds is
declared dead and a new view goes out. Tables are created here first (idempotent by name and
spec; a conflicting spec is refused), then on the servers by the worker that asked. Shards of a
data set are handed out as leases, one epoch at a time (:class:`_LeaseBook`).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramserver import checkpoint
from paramserver.config import CheckpointPolicy, Timeouts
from paramserver.errors import ConfigError, ProtocolError
from paramserver.metrics import LATENCY_BUCKETS, STALENESS_BUCKETS, Rate, serve_prometheus
from paramserver.partition import dense_ranges
from paramserver.spec import TableSpec
from paramserver.wire import protocol
from paramserver.wire.transport import (
    Endpoint,
    Future,
    Router,
    Security,
    new_context,
)

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)

PENDING, ALIVE, DEAD, LEFT = "pending", "alive", "dead", "left"


@dataclass
class Member:
    role: str
    rank: int
    state: str = PENDING
    address: str = ""
    host: str = ""
    pid: int = 0
    token: int = 0
    identity: bytes = b""
    last_seen: float = 0.0
    # the connection its heartbeats come on, and whether libzmq still holds it (ZMTP pings
    # answered by the member's I/O thread, whatever its Python code is doing)
    link: int = -1
    link_up: bool = False
    clock: int = 0  # a server's min clock over live workers, from its heartbeats
    examples: int = 0  # a worker's reported examples, from its heartbeats

    @property
    def name(self) -> str:
        return f"{self.role}[{self.rank}]"


@dataclass
class _Round:
    """A checkpoint round in progress."""

    round_id: int
    root: Path
    partial: Path
    clock: int
    waiting: set[int]
    deadline: float
    requester: tuple[bytes, int] | None = None


@dataclass
class _Barrier:
    arrived: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    deadline: float = 0.0


@dataclass
class _LeaseBook:
    """The shards of one data set in one epoch: still to hand out, held (by rank), done."""

    shards: int
    todo: list[int]
    held: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)


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
    ) -> None:
        if num_servers < 1:
            raise ConfigError(f"a cluster needs at least 1 server, got {num_servers}")
        if num_workers < 1:
            raise ConfigError(f"a cluster needs at least 1 worker, got {num_workers}")
        self.timeouts = timeouts or Timeouts()
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
        self.epoch = 1
        self.servers = [Member("server", r) for r in range(num_servers)]
        self.workers = [Member("worker", r) for r in range(num_workers)]
        self.tables: dict[str, TableSpec] = {}
        self.barriers: dict[str, _Barrier] = {}
        self.waiting_workers: list[tuple[bytes, dict[str, Any], float]] = []
        self._rejections = protocol.Rejections()
        self.rounds: dict[int, _Round] = {}
        self._round_ids = 0
        self.checkpoints = checkpoints
        self._next_periodic = time.monotonic() + (checkpoints.every_seconds if checkpoints else 0)
        self._next_clock: int | None = None
        self._lead = 2  # how far ahead of the reported clocks a periodic round aims
        self.start_clock = 0
        self.restore: dict[str, Any] | None = None
        if restore is not None:
            self._load_restore(restore)
        self.leases: dict[tuple[str, int], _LeaseBook] = {}
        # the newest checkpoint this cluster can restore from: a replaced server loads its shards
        self.latest_checkpoint: dict[str, Any] | None = self.restore
        # worker rank -> the clock it rejoined at, until every server has seen it (see view())
        self.rejoined: dict[int, int] = {}
        self._stop = threading.Event()
        self._init_status(security, metrics_port, metrics_host)

    def _load_restore(self, path: str) -> None:
        directory, manifest, specs = checkpoint.read_manifest(path)
        servers = [m.rank for m in self.servers]
        for spec in specs:
            if spec.kind == "dense":
                spec = spec.with_ranges(dense_ranges(spec.name, spec.size, servers))
            self.tables[spec.name] = spec
        self.start_clock = int(manifest["clock"])
        self.restore = {"path": str(directory), "clock": self.start_clock}
        log.info(
            "restoring %d tables at clock %d from %s (written by %d servers, now %d)",
            len(specs),
            self.start_clock,
            directory,
            manifest["num_servers"],
            len(servers),
        )

    # ---- the loop -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Run until :meth:`stop` or a ``shutdown`` request."""
        log.info(
            "coordinator bound at %s, expecting %d servers and %d workers",
            self.address,
            len(self.servers),
            len(self.workers),
        )
        poller = self.router.poller()
        try:
            while not self._stop.is_set():
                if poller.poll(100):
                    for _ in range(1000):
                        try:
                            identity, frames = self.router.recv_raw_nowait()
                        except BlockingIOError:
                            break
                        self._handle(identity, frames)
                    self._links_dropped(self.router.dropped())
                self._check_deadlines(time.monotonic())
                self._gather_status(time.monotonic())
        finally:
            self._close_status()
            self.router.close()
            self.ctx.term()
            log.info("coordinator stopped")

    def _handle(self, identity: bytes, frames: list[Any]) -> None:
        try:
            header, _ = protocol.decode(frames)
        except ProtocolError as exc:
            if self._rejections.count():
                log.warning(
                    "coordinator: malformed message dropped (%d so far): %s",
                    self._rejections.total,
                    exc,
                )
            self._answer_malformed(identity, exc)
            return
        kind, rid = header["kind"], header["id"]
        handler = getattr(self, f"_on_{kind}", None)
        if handler is None:
            self.router.error(
                identity, rid, "bad_request", f"the coordinator does not take {kind!r}"
            )
            return
        try:
            handler(identity, header)
        except ConfigError as exc:
            self.router.error(identity, rid, "invalid", str(exc))
        except Exception as exc:  # a bug must not take the coordinator down with it
            if self._rejections.count():
                log.exception("coordinator: %s request %d failed", kind, rid)
            self.router.error(identity, rid, "internal", f"{type(exc).__name__}: {exc}"[:4096])

    def _answer_malformed(self, identity: bytes, exc: ProtocolError) -> None:
        self.router.error(identity, 0, "protocol", f"coordinator: {exc}")

    # ---- membership -----------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "epoch": self.epoch,
            "servers": [[m.rank, m.address, m.state] for m in self.servers],
            "workers": [[m.rank, m.state] for m in self.workers],
        }
        if self.rejoined:
            # a restarted worker comes back at this clock: the servers set its clock to it
            view["rejoined"] = [[r, c] for r, c in sorted(self.rejoined.items())]
        return view

    def _publish(self, reason: str) -> None:
        self.epoch += 1
        log.info("view %d: %s", self.epoch, reason)
        view = self.view()
        for m in (*self.servers, *self.workers):
            if m.state == ALIVE and m.identity:
                self.router.send(m.identity, {"kind": "view", "id": 0, "view": view})

    def _on_register(self, identity: bytes, h: dict[str, Any]) -> None:
        if h["role"] == "server":
            self._register_server(identity, h)
        else:
            self.waiting_workers.append((identity, h, time.monotonic()))
            self._admit_workers()

    def _register_server(self, identity: bytes, h: dict[str, Any]) -> None:
        if not h.get("address"):
            self.router.error(identity, h["id"], "invalid", "a server must register its address")
            return
        want = h.get("rank")
        if want is not None and want < len(self.servers) and self._gone(self.servers[want], h):
            self._declare_dead(self.servers[want], "its process is gone and a replacement is here")
        if want is not None:
            if want >= len(self.servers) or self.servers[want].state == ALIVE:
                self.router.error(
                    identity,
                    h["id"],
                    "taken",
                    f"server rank {want} is not free (the cluster has {len(self.servers)} servers)",
                )
                return
            m = self.servers[want]
        else:
            free = [s for s in self.servers if s.state in (PENDING, DEAD, LEFT)]
            if not free:
                self.router.error(
                    identity,
                    h["id"],
                    "full",
                    f"all {len(self.servers)} server ranks are taken by live servers",
                )
                return
            m = free[0]
        replacing = m.state in (DEAD, LEFT)
        self._activate(m, identity, h)
        view = self._view_with_token(m)
        tables = None
        if replacing:
            # a replacement: it creates every table and loads its keys from the newest
            # checkpoint, if any (updates since that checkpoint are lost on this server)
            view.pop("restore", None)
            if self.latest_checkpoint is not None:
                view["restore"] = self.latest_checkpoint
            tables = [s.to_wire() for s in self.tables.values()]
        elif self.restore:
            tables = [s.to_wire() for s in self.tables.values()]
        self.router.reply(identity, h["id"], rank=m.rank, view=view, tables=tables)
        self._publish(
            f"{m.name} {'replaced' if replacing else 'registered'} at {m.address}"
            + (f" (restoring {view['restore']['path']})" if replacing and "restore" in view else "")
        )
        self._admit_workers()

    def _gone(self, m: Member, h: dict[str, Any]) -> bool:
        """Whether live member ``m``, which a newcomer wants to replace, is surely dead already:
        it ran on this host (same name), its pid is gone here, and it missed two heartbeats
        (so a live namesake in another pid namespace, still beating, is never taken for dead).
        Saves a replacement the wait for the heartbeat timeout."""
        if m.state != ALIVE or not m.pid or m.host != h.get("host"):
            return False
        if m.host != socket.gethostname()[:256]:
            return False
        if time.monotonic() - m.last_seen < 2 * self.timeouts.heartbeat_interval:
            return False
        try:
            os.kill(m.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _links_dropped(self, fds: list[int]) -> None:
        for m in (*self.servers, *self.workers):
            if m.link in fds:
                m.link_up = False

    def _declare_dead(self, m: Member, why: str) -> None:
        m.state = DEAD
        log.warning("%s (%s) declared dead: %s", m.name, m.address or f"pid {m.pid}", why)
        if m.role == "worker":
            self._requeue_leases(m)
        else:  # a round waiting for it would block every later checkpoint until its timeout
            for rnd in list(self.rounds.values()):
                if m.rank in rnd.waiting:
                    self._fail_round(rnd, f"{m.name} died before it wrote its shards")
        self._publish(f"{m.name} declared dead")
        self._check_barriers()

    def _current_clock(self) -> int:
        """The cluster's clock as the live servers last reported it (their min clocks)."""
        clocks = [m.clock for m in self.servers if m.state == ALIVE]
        return max(clocks, default=self.start_clock)

    def _view_with_token(self, m: Member) -> dict[str, Any]:
        extra: dict[str, Any] = {"start_clock": self.start_clock}
        if self.restore is not None:
            extra["restore"] = self.restore
        return {
            **extra,
            **self.view(),
            "token": m.token,
            "num_servers": len(self.servers),
            "num_workers": len(self.workers),
        }

    def _activate(self, m: Member, identity: bytes, h: dict[str, Any]) -> None:
        m.state, m.identity = ALIVE, identity
        m.address = h.get("address") or ""
        m.host, m.pid = h.get("host") or "", h.get("pid") or 0
        m.token = secrets.randbits(62) + 1
        m.last_seen = time.monotonic()
        m.link, m.link_up = -1, False  # known from its first heartbeat on

    def _admit_workers(self) -> None:
        if any(s.state == PENDING for s in self.servers) or not self.waiting_workers:
            return
        waiting, self.waiting_workers = self.waiting_workers, []
        for identity, h, _ in waiting:
            want = h.get("rank")
            if want is not None:
                if want >= len(self.workers):
                    self.router.error(
                        identity,
                        h["id"],
                        "invalid",
                        f"rank {want} asked for, but the cluster has "
                        f"{len(self.workers)} workers (ranks 0..{len(self.workers) - 1})",
                    )
                    continue
                m = self.workers[want]
                if m.state == ALIVE:
                    self.router.error(
                        identity,
                        h["id"],
                        "taken",
                        f"worker rank {want} is already taken by a live worker",
                    )
                    continue
            else:
                free = [w for w in self.workers if w.state == PENDING]
                if not free:
                    self.router.error(
                        identity,
                        h["id"],
                        "full",
                        f"the cluster expects {len(self.workers)} workers and "
                        "every rank has been taken",
                    )
                    continue
                m = free[0]
            rejoin = m.state in (DEAD, LEFT)
            self._activate(m, identity, h)
            view = self._view_with_token(m)
            if rejoin:
                # a restarted worker goes on from where the live workers are, not from 0
                view["start_clock"] = self.rejoined[m.rank] = self._current_clock()
            self.router.reply(identity, h["id"], rank=m.rank, view=view)
            self._publish(
                f"{m.name} "
                + (f"rejoined at clock {view['start_clock']}" if rejoin else "registered")
            )

    def _member(self, role: str, rank: int) -> Member | None:
        members = self.servers if role == "server" else self.workers
        return members[rank] if rank < len(members) else None

    def _on_heartbeat(self, identity: bytes, h: dict[str, Any]) -> None:
        m = self._member(h["role"], h["rank"])
        if m is None or m.state != ALIVE or m.token != h["token"]:
            self.router.error(
                identity,
                h["id"],
                "expelled",
                f"{h['role']}[{h['rank']}] is not a live member of this cluster "
                "(declared dead or never registered)",
            )
            return
        m.last_seen = time.monotonic()
        m.link, m.link_up = self.router.last_fd, self.router.last_fd >= 0
        if h.get("clock") is not None:
            m.clock = h["clock"]
            if self.rejoined and m.role == "server":
                # once every live server's min clock has passed a rejoin, it is no news
                low = min(s.clock for s in self.servers if s.state == ALIVE)
                for r, c in list(self.rejoined.items()):
                    if low > c:
                        del self.rejoined[r]
        if h.get("examples") is not None:
            m.examples = h["examples"]
            self._examples_rate.setdefault(m.rank, Rate()).add(m.last_seen, m.examples)
        self.router.reply(identity, h["id"], view={"epoch": self.epoch})

    def _on_leave(self, identity: bytes, h: dict[str, Any]) -> None:
        m = self._member(h["role"], h["rank"])
        if m is not None and m.state == ALIVE and m.token == h["token"]:
            m.state = LEFT
            self._requeue_leases(m)
            self._publish(f"{m.name} left")
            self._check_barriers()
        self.router.reply(identity, h["id"])

    def _on_get_view(self, identity: bytes, h: dict[str, Any]) -> None:
        self.router.reply(identity, h["id"], view=self.view())

    # ---- checkpoints ----------------------------------------------------------------------

    def _on_save(self, identity: bytes, h: dict[str, Any]) -> None:
        err = self._start_round(Path(h["path"]), h["clock"], h["timeout"], (identity, h["id"]))
        if err:
            self.router.error(identity, h["id"], "checkpoint", err)

    def _start_round(
        self, root: Path, clock: int, timeout: float, requester: tuple[bytes, int] | None
    ) -> str | None:
        if self.rounds:
            return "a checkpoint is already being written; try again when it is done"
        alive = [m for m in self.servers if m.state == ALIVE]
        if len(alive) != len(self.servers):
            return "not every server is alive: " + ", ".join(
                f"{m.name} is {m.state}" for m in self.servers if m.state != ALIVE
            )
        self._round_ids += 1
        rid = self._round_ids
        partial = root / f".partial-{clock:08d}-{rid}"
        try:
            partial.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            return f"cannot create {partial}: {exc}"
        self.rounds[rid] = _Round(
            rid,
            root,
            partial,
            clock,
            {m.rank for m in alive},
            time.monotonic() + timeout,
            requester,
        )
        for m in alive:
            self.router.send(
                m.identity, {"kind": "checkpoint", "id": rid, "path": str(partial), "clock": clock}
            )
        log.info("checkpoint round %d at clock %d into %s started", rid, clock, root)
        return None

    def _server_by_identity(self, identity: bytes) -> Member | None:
        return next((m for m in self.servers if m.identity == identity and m.state == ALIVE), None)

    def _on_reply(self, identity: bytes, h: dict[str, Any]) -> None:
        rnd, m = self.rounds.get(h["id"]), self._server_by_identity(identity)
        if rnd is None or m is None:
            return
        rnd.waiting.discard(m.rank)
        if not rnd.waiting:
            self._finish_round(rnd)

    def _on_error(self, identity: bytes, h: dict[str, Any]) -> None:
        rnd = self.rounds.get(h["id"])
        if rnd is None:
            return
        if h["code"] == "too_late" and rnd.requester is None:
            # a periodic round aimed at a clock some server had already passed (heartbeats
            # report clocks late): drop it quietly and aim further ahead next time
            self._lead = min(2 * self._lead, 1 << 16)
            self.rounds.pop(rnd.round_id, None)
            shutil.rmtree(rnd.partial, ignore_errors=True)
            self._next_periodic = 0.0
            log.debug(
                "checkpoint round %d: %s; retrying %d clocks ahead",
                rnd.round_id,
                h["message"],
                self._lead,
            )
            return
        self._fail_round(rnd, h["message"])

    def _finish_round(self, rnd: _Round) -> None:
        del self.rounds[rnd.round_id]
        keep = self.checkpoints.keep if self.checkpoints else None
        try:
            final = checkpoint.commit_checkpoint(
                rnd.root,
                rnd.partial,
                clock=rnd.clock,
                round_id=rnd.round_id,
                tables=list(self.tables.values()),
                num_servers=len(self.servers),
                num_workers=len(self.workers),
                keep=keep,
            )
        except OSError as exc:
            self._fail_round(rnd, f"writing the manifest failed: {exc}")
            return
        log.info("checkpoint at clock %d written: %s", rnd.clock, final)
        self.latest_checkpoint = {"path": str(final), "clock": rnd.clock}
        self.last_checkpoint = (time.time(), str(final))
        if rnd.requester is not None:
            self.router.reply(rnd.requester[0], rnd.requester[1], path=str(final))

    def _fail_round(self, rnd: _Round, reason: str) -> None:
        self.rounds.pop(rnd.round_id, None)
        shutil.rmtree(rnd.partial, ignore_errors=True)
        log.error("checkpoint round %d at clock %d failed: %s", rnd.round_id, rnd.clock, reason)
        if rnd.requester is not None:
            self.router.error(
                rnd.requester[0],
                rnd.requester[1],
                "checkpoint",
                f"checkpoint at clock {rnd.clock} failed: {reason}",
            )

    def _periodic_checkpoint(self, now: float) -> None:
        policy = self.checkpoints
        if policy is None or self.rounds:
            return
        clocks = [m.clock for m in self.servers if m.state == ALIVE]
        if not clocks or not any(w.state == ALIVE for w in self.workers) or max(clocks) >= 1 << 61:
            return
        if policy.every_clocks is not None:
            # every N clocks: the first round at the next multiple of N
            if self._next_clock is None:
                self._next_clock = (max(clocks) // policy.every_clocks + 1) * policy.every_clocks
            if max(clocks) + self._lead < self._next_clock:
                return
            target = max(self._next_clock, max(clocks) + self._lead)
            self._next_clock = target + policy.every_clocks
        else:
            if now < self._next_periodic:
                return
            self._next_periodic = now + policy.every_seconds
            target = max(clocks) + self._lead
        err = self._start_round(Path(policy.directory), target, policy.timeout, None)
        if err:
            log.warning("periodic checkpoint skipped: %s", err)

    def _check_deadlines(self, now: float) -> None:
        self._periodic_checkpoint(now)
        for rnd in list(self.rounds.values()):
            if now > rnd.deadline:
                waiting = ", ".join(f"server[{r}]" for r in sorted(rnd.waiting))
                self._fail_round(
                    rnd, f"timed out waiting for {waiting} to reach clock {rnd.clock} and write"
                )
        limit = self.timeouts.heartbeat_timeout
        for m in (*self.servers, *self.workers):
            # silent for the timeout and its connection gone too (closed, or its pings
            # unanswered): a member whose own code holds the GIL stays connected
            if m.state == ALIVE and now - m.last_seen > limit and not m.link_up:
                self._declare_dead(m, f"no heartbeat for {now - m.last_seen:.1f}s")
        for name, b in list(self.barriers.items()):
            if now > b.deadline:
                missing = self._barrier_missing(b)
                del self.barriers[name]
                msg = f"barrier {name.split('#')[0]!r} timed out waiting for " + ", ".join(
                    f"worker[{r}]" for r in missing
                )
                for identity, rid in b.arrived.values():
                    self.router.error(identity, rid, "timeout", msg)

    # ---- tables ---------------------------------------------------------------------------

    def _on_create_table(self, identity: bytes, h: dict[str, Any]) -> None:
        spec = TableSpec.from_wire(
            {**h["spec"], "ranges": []} if h["spec"].get("kind") == "dense" else h["spec"]
        )
        old = self.tables.get(spec.name)
        if old is not None:
            diff = old.conflicts(spec)
            if diff:
                self.router.error(
                    identity,
                    h["id"],
                    "conflict",
                    f"table {spec.name!r} already exists with a different "
                    f"{', '.join(diff)} (existing: "
                    + ", ".join(f"{k}={old.definition().get(k)!r}" for k in diff)
                    + ")",
                )
                return
            self.router.reply(identity, h["id"], spec=old.to_wire())
            return
        if spec.kind == "dense":
            spec = spec.with_ranges(
                dense_ranges(spec.name, spec.size, [m.rank for m in self.servers])
            )
        self.tables[spec.name] = spec
        log.info(
            "table %r created (%s, %s, %s)",
            spec.name,
            spec.kind,
            spec.optimizer.to_spec()["kind"],
            spec.consistency,
        )
        self.router.reply(identity, h["id"], spec=spec.to_wire())

    def _on_list_tables(self, identity: bytes, h: dict[str, Any]) -> None:
        self.router.reply(identity, h["id"], tables=[s.to_wire() for s in self.tables.values()])

    # ---- barriers -------------------------------------------------------------------------

    def _barrier_missing(self, b: _Barrier) -> list[int]:
        return [
            w.rank for w in self.workers if w.state in (PENDING, ALIVE) and w.rank not in b.arrived
        ]

    def _on_barrier(self, identity: bytes, h: dict[str, Any]) -> None:
        b = self.barriers.setdefault(h["name"], _Barrier())
        b.arrived[h["rank"]] = (identity, h["id"])
        b.deadline = max(b.deadline, time.monotonic() + h["timeout"])
        self._check_barriers()

    def _check_barriers(self) -> None:
        for name, b in list(self.barriers.items()):
            if not self._barrier_missing(b):
                del self.barriers[name]
                for identity, rid in b.arrived.values():
                    self.router.reply(identity, rid)

    # ---- data leases ----------------------------------------------------------------------
    # Every worker of a data set asks for the next shard of an epoch; each shard is handed out
    # once per epoch, in an order shuffled by (data set, epoch). A lease is held by its worker's
    # rank until completed; the leases of a worker that dies or leaves go back to the queue, so
    # an epoch covers every shard whoever survives.

    def _requeue_leases(self, m: Member) -> None:
        for (dataset, epoch), book in self.leases.items():
            lost = sorted(s for s, r in book.held.items() if r == m.rank)
            for shard in lost:
                del book.held[shard]
                book.todo.append(shard)  # handed out next
            if lost:
                log.warning(
                    "%s: leases %s of %r epoch %d go back to the queue",
                    m.name,
                    lost,
                    dataset,
                    epoch,
                )

    def _lease_book(self, h: dict[str, Any]) -> _LeaseBook:
        key = (h["dataset"], h["epoch"])
        book = self.leases.get(key)
        if book is None:
            if "shards" not in h:
                raise ConfigError(
                    f"data set {h['dataset']!r} epoch {h['epoch']}: no lease was ever handed out"
                )
            order = list(range(h["shards"]))
            random.Random(f"{h['dataset']}/{h['epoch']}").shuffle(order)
            book = self.leases[key] = _LeaseBook(h["shards"], order[::-1])
            self.leases.pop((h["dataset"], h["epoch"] - 2), None)  # keep the last two epochs
        elif "shards" in h and h["shards"] != book.shards:
            raise ConfigError(
                f"data set {h['dataset']!r} epoch {h['epoch']} has {book.shards} shards, "
                f"worker[{h['rank']}] counts {h['shards']}: the workers disagree on the data"
            )
        return book

    def _on_acquire_lease(self, identity: bytes, h: dict[str, Any]) -> None:
        book = self._lease_book(h)
        shard = book.todo.pop() if book.todo else -1
        if shard >= 0:
            book.held[shard] = h["rank"]
        self.router.reply(identity, h["id"], shard=shard)

    def _on_complete_lease(self, identity: bytes, h: dict[str, Any]) -> None:
        book = self._lease_book(h)
        shard = h["shard"]
        if book.held.get(shard) != h["rank"]:
            raise ConfigError(
                f"data set {h['dataset']!r} epoch {h['epoch']}: shard {shard} is not leased to "
                f"worker[{h['rank']}]"
            )
        del book.held[shard]
        book.done.add(shard)
        self.router.reply(identity, h["id"])

    # ---- shutdown -------------------------------------------------------------------------

    def _on_shutdown(self, identity: bytes, h: dict[str, Any]) -> None:
        log.info(
            "shutdown requested: stopping %d servers", sum(m.state == ALIVE for m in self.servers)
        )
        for m in self.servers:
            if m.state == ALIVE and m.identity:
                self.router.send(m.identity, {"kind": "stop", "id": 0})
        self.router.reply(identity, h["id"])
        self._stop.set()

    def _on_ping(self, identity: bytes, h: dict[str, Any]) -> None:
        self.router.reply(identity, h["id"])

    # ---- status and metrics ---------------------------------------------------------------
    # Every ``STATS_INTERVAL`` seconds the loop asks each live server for its ``stats`` (rows,
    # bytes, pull and push counts, latency and staleness histograms) on its own DEALERs, and
    # keeps the answers; ``status`` requests and the Prometheus exporter (another thread) read
    # ``snapshot``, a map rebuilt by the loop and replaced whole, so no lock is needed.

    STATS_INTERVAL = 1.0
    last_checkpoint: tuple[float, str] | None  # (wall time, directory) of the last one written

    def _init_status(
        self, security: Security | None, metrics_port: int | None, metrics_host: str
    ) -> None:
        self.started = time.monotonic()
        self.last_checkpoint = None
        self._examples_rate: dict[int, Rate] = {}
        self._server_stats: dict[int, tuple[float, dict[str, Any]]] = {}
        self._server_rates: dict[tuple[int, str, str], Rate] = {}
        self._stats_inflight: dict[int, tuple[Future[dict[str, Any]], float]] = {}
        self._stats_ep = Endpoint(self.ctx, request_timeout=10.0, security=security)
        self._next_stats = 0.0
        self.snapshot: dict[str, Any] | None = None
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

    def _close_status(self) -> None:
        if self._stop_metrics is not None:
            self._stop_metrics()
        self._stats_ep.close()

    def _gather_status(self, now: float) -> None:
        self._stats_ep.poll(0)
        if now < self._next_stats:
            return
        self._next_stats = now + self.STATS_INTERVAL
        for m in self.servers:
            name = m.name
            if m.state != ALIVE or not m.address:
                self._stats_inflight.pop(m.rank, None)
                continue
            pending = self._stats_inflight.get(m.rank)
            if pending is not None and not pending[0].done():
                if now - pending[1] < 10.0:
                    continue
                self._stats_ep.disconnect(name, f"{name}: stats unanswered for 10s")
            self._stats_ep.connect(name, m.address)
            fut = self._stats_ep.request(name, {"kind": "stats"}, what=f"stats of {name}")
            fut.add_done_callback(functools.partial(self._on_stats_answer, m.rank))
            self._stats_inflight[m.rank] = (fut, now)
        self.snapshot = self.status()

    def _on_stats_answer(self, rank: int, fut: Future[dict[str, Any]]) -> None:
        if fut.exception(0) is not None:
            return
        stats = fut.result(0).get("stats")
        if not _sane_stats(stats):
            log.warning("server[%d] answered stats the coordinator cannot read", rank)
            return
        assert isinstance(stats, dict)
        now = time.monotonic()
        self._server_stats[rank] = (now, stats)
        for table, t in stats["tables"].items():
            if isinstance(t, dict):
                for what in ("pulls", "pushes"):
                    rate = self._server_rates.setdefault((rank, table, what), Rate())
                    rate.add(now, float(t.get(what, 0)))

    def _rate(self, rank: int, table: str, what: str) -> float:
        rate = self._server_rates.get((rank, table, what))
        return rate.per_second() if rate is not None else 0.0

    def status(self) -> dict[str, Any]:
        """The cluster's state as one plain map: nodes, workers' clocks and examples/s, tables
        per server, servers' traffic, staleness, the last checkpoint (see paramserver.metrics).

        Example:
            print(paramserver.metrics.format_status(coord.status()))
        """
        now = time.monotonic()
        nodes = []
        for m in (*self.servers, *self.workers):
            node: dict[str, Any] = {
                "role": m.role,
                "rank": m.rank,
                "state": m.state,
                "address": m.address,
                "host": m.host,
                "pid": m.pid,
                "last_heartbeat": round(now - m.last_seen, 3) if m.last_seen else None,
                "clock": m.clock,
            }
            if m.role == "worker":
                rate = self._examples_rate.get(m.rank)
                node["examples"] = m.examples
                node["examples_per_s"] = rate.per_second() if rate is not None else 0.0
            nodes.append(node)
        tables = []
        for spec in self.tables.values():
            per = []
            for rank, (_, st) in sorted(self._server_stats.items()):
                t = st["tables"].get(spec.name)
                if isinstance(t, dict):
                    per.append(
                        {
                            "rank": rank,
                            "rows": int(t.get("rows", 0)),
                            "bytes": int(t.get("bytes", 0)),
                            "pulls": int(t.get("pulls", 0)),
                            "pushes": int(t.get("pushes", 0)),
                            "pulls_per_s": self._rate(rank, spec.name, "pulls"),
                            "pushes_per_s": self._rate(rank, spec.name, "pushes"),
                        }
                    )
            tables.append(
                {
                    "name": spec.name,
                    "kind": spec.kind,
                    "consistency": spec.consistency,
                    "optimizer": str(spec.optimizer.to_spec()["kind"]),
                    "servers": per,
                }
            )
        servers: list[dict[str, Any]] = []
        staleness: dict[str, list[Any]] = {}
        for rank, (seen, st) in sorted(self._server_stats.items()):
            clocks = [c for c in st.get("clocks", []) if isinstance(c, int)]
            metrics: dict[str, Any] = st.get("metrics") or {}
            tabs = st["tables"].values()
            servers.append(
                {
                    "rank": rank,
                    "age": round(now - seen, 3),
                    "min_clock": self.servers[rank].clock if rank < len(self.servers) else 0,
                    "clocks": clocks,
                    "deferred": st.get("deferred", 0),
                    "pulls_per_s": sum(self._rate(rank, n, "pulls") for n in st["tables"]),
                    "pushes_per_s": sum(self._rate(rank, n, "pushes") for n in st["tables"]),
                    "pulls": sum(int(t.get("pulls", 0)) for t in tabs if isinstance(t, dict)),
                    "pushes": sum(int(t.get("pushes", 0)) for t in tabs if isinstance(t, dict)),
                    "latency": metrics.get("latency") or {},
                }
            )
            for name, hist in (metrics.get("staleness") or {}).items():
                counts, total = hist
                old = staleness.get(name)
                if old is None:
                    staleness[name] = [list(counts), float(total)]
                else:
                    old[0] = [a + b for a, b in zip(old[0], counts, strict=False)]
                    old[1] += float(total)
        ck = None
        if self.last_checkpoint is not None:
            ck = {"path": self.last_checkpoint[1], "age": time.time() - self.last_checkpoint[0]}
        return {
            "address": self.address,
            "epoch": self.epoch,
            "time": time.time(),
            "uptime": now - self.started,
            "nodes": nodes,
            "tables": tables,
            "servers": servers,
            "staleness": staleness,
            "checkpoint": ck,
            "buckets": {"latency": list(LATENCY_BUCKETS), "staleness": list(STALENESS_BUCKETS)},
        }

    def _on_status(self, identity: bytes, h: dict[str, Any]) -> None:
        self.router.reply(identity, h["id"], status=self.status())


def _is_hist(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], list)
        and all(isinstance(c, int) for c in v[0])
        and isinstance(v[1], int | float)
    )


def _sane_stats(st: Any) -> bool:
    """A server's stats answer has the shape status() reads (a bad one is ignored, not fatal)."""
    if not isinstance(st, dict) or not isinstance(st.get("tables"), dict):
        return False
    if not all(isinstance(t, dict) for t in st["tables"].values()):
        return False
    m = st.get("metrics", {})
    return (
        isinstance(m, dict)
        and isinstance(m.get("latency", {}), dict)
        and isinstance(m.get("staleness", {}), dict)
        and all(
            _is_hist(h) for h in (*m.get("latency", {}).values(), *m.get("staleness", {}).values())
        )
    )
