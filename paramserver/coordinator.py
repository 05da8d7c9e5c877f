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

import logging
import os
import random
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramserver import protocol
from paramserver.config import Timeouts
from paramserver.errors import ConfigError, ProtocolError
from paramserver.partition import dense_ranges
from paramserver.server import checkpoint
from paramserver.spec import TableSpec
from paramserver.transport import Router, Security, new_context, start_authenticator

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
    clock: int = 0  # a server's min clock over live workers, from its heartbeats

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


@dataclass(frozen=True)
class CheckpointPolicy:
    """Periodic checkpoints into ``directory``: every ``every_seconds``, or every
    ``every_clocks`` clocks when that is set; keeping the last ``keep``."""

    directory: str
    every_seconds: float = 600.0
    keep: int = 3
    timeout: float = 600.0
    every_clocks: int | None = None

    def __post_init__(self) -> None:
        if not self.every_seconds > 0:
            raise ConfigError(f"checkpoint interval must be positive, got {self.every_seconds}")
        if not (isinstance(self.keep, int) and self.keep >= 1):
            raise ConfigError(f"checkpoints to keep must be at least 1, got {self.keep}")
        if self.every_clocks is not None and not self.every_clocks >= 1:
            raise ConfigError(f"checkpoint clock interval must be >= 1, got {self.every_clocks}")


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
    ) -> None:
        if num_servers < 1:
            raise ConfigError(f"a cluster needs at least 1 server, got {num_servers}")
        if num_workers < 1:
            raise ConfigError(f"a cluster needs at least 1 worker, got {num_workers}")
        self.timeouts = timeouts or Timeouts()
        self.ctx = new_context()
        self.auth = start_authenticator(self.ctx, security) if security is not None else None
        try:
            self.router = Router(self.ctx, host, port, security)
        except BaseException:  # e.g. the address is in use: leave no thread or context behind
            if self.auth is not None:
                self.auth.stop()
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
        sock = self.router.socket
        try:
            while not self._stop.is_set():
                if sock.poll(100):
                    for _ in range(1000):
                        try:
                            identity, frames = self.router.recv_raw_nowait()
                        except BlockingIOError:
                            break
                        self._handle(identity, frames)
                self._check_deadlines(time.monotonic())
        finally:
            self.router.close()
            if self.auth is not None:
                self.auth.stop()
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
        if h.get("clock") is not None:
            m.clock = h["clock"]
            if self.rejoined and m.role == "server":
                # once every live server's min clock has passed a rejoin, it is no news
                low = min(s.clock for s in self.servers if s.state == ALIVE)
                for r, c in list(self.rejoined.items()):
                    if low > c:
                        del self.rejoined[r]
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
            if m.state == ALIVE and now - m.last_seen > limit:
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
