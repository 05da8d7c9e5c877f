"""Membership and views: who belongs to the cluster, under which rank, and whether alive.

Plain state, no sockets: the loop hands a :class:`Membership` what arrived (a registration, a
heartbeat, the connections libzmq dropped, the time) and sends what it decides. The rules:

* Ranks. A server may ask for a rank (a replacement keeps its predecessor's); otherwise it
  gets the lowest rank that is pending, dead or left. A worker may ask for a rank too (a
  restarted worker takes its old one back); otherwise it gets the lowest pending rank, so a
  rank once taken is never handed to a stranger.
* Workers wait until every server has registered; then the waiting ones are admitted in order.
* A rejoining worker starts at the cluster's current clock (the live servers' highest min
  clock), and the view names it under ``rejoined`` until every live server has passed it.
* Liveness. A member is declared dead only when its heartbeats stopped for the heartbeat
  timeout AND its libzmq connection is gone (closed, or its ZMTP pings unanswered): a member
  whose own Python code holds the GIL still answers pings from its I/O thread and stays.
  A server that asks for the rank of a live one whose process is surely gone (same host, pid
  not running, two heartbeats missed) replaces it at once.
* Every registration gets a fresh incarnation number; a heartbeat or a leave with another one
  is refused, so a member declared dead cannot come back unnoticed.

The wire names the view number ``epoch`` and the incarnation ``token``
(:data:`~paramserver.wire.messages.VIEW_NUMBER`, :data:`~paramserver.wire.messages.INCARNATION`).
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paramserver.config import Timeouts
from paramserver.coordinator.refusal import Refusal
from paramserver.errors import ConfigError
from paramserver.metrics import process_gone
from paramserver.partition import check_replication
from paramserver.wire.messages import (
    INCARNATION,
    VIEW_NUMBER,
    HeartbeatMsg,
    LeaveMsg,
    RegisterMsg,
)

__all__ = ["ALIVE", "DEAD", "LEFT", "PENDING", "Member", "Membership"]

log = logging.getLogger(__name__)

PENDING, ALIVE, DEAD, LEFT = "pending", "alive", "dead", "left"
# with replication: a server that took over a dead rank holds none of its ranges yet; views
# list it so, and workers neither read from it nor write to it (docs/fault-tolerance.md)
REBUILDING = "rebuilding"


@dataclass
class Member:
    role: str
    rank: int
    state: str = PENDING
    address: str = ""
    host: str = ""
    pid: int = 0
    incarnation: int = 0  # fresh at every registration
    identity: bytes = b""
    last_seen: float = 0.0
    # the connection its heartbeats come on, and whether libzmq still holds it (ZMTP pings
    # answered by the member's I/O thread, whatever its Python code is doing)
    link: int = -1
    link_up: bool = False
    clock: int = 0  # a server's min clock over live workers, from its heartbeats
    examples: int = 0  # a worker's reported examples, from its heartbeats
    # a worker's training scalars and bytes per table, from its heartbeats (StatusBoard reads it)
    metrics: dict[str, Any] | None = None
    rebuilding: bool = False  # a server replacing a dead one under replication (REBUILDING)

    @property
    def shown(self) -> str:
        """Its state as views list it (REBUILDING for a server not yet holding its ranges)."""
        return REBUILDING if self.rebuilding and self.state == ALIVE else self.state

    @property
    def name(self) -> str:
        return f"{self.role}[{self.rank}]"


class Membership:
    """The members of one cluster and its view.

    Example:
        members = Membership(1, 1, Timeouts())
        server, _ = members.register_server(b"s", {"kind": "register", "id": 1,
                                                   "role": "server", "address": "tcp://h:1"}, 0.0)
        members.wait(b"w", {"kind": "register", "id": 2, "role": "worker"}, 0.0)
        [(identity, h, _)] = members.admissible()
        worker, view, rejoin = members.admit_worker(identity, h, 0.0)   # worker[0]
    """

    def __init__(
        self,
        num_servers: int,
        num_workers: int,
        timeouts: Timeouts,
        *,
        hostname: str | None = None,
        process_gone: Callable[[int], bool] = process_gone,
        replication: int = 1,
    ) -> None:
        if num_servers < 1:
            raise ConfigError(f"a cluster needs at least 1 server, got {num_servers}")
        check_replication(replication, num_servers)
        self.replication = replication
        if num_workers < 1:
            raise ConfigError(f"a cluster needs at least 1 worker, got {num_workers}")
        self.timeouts = timeouts
        self.view_number = 1
        self.servers = [Member("server", r) for r in range(num_servers)]
        self.workers = [Member("worker", r) for r in range(num_workers)]
        self.waiting: list[tuple[bytes, RegisterMsg, float]] = []
        # worker rank -> the clock it rejoined at, until every server has seen it (see view())
        self.rejoined: dict[int, int] = {}
        self.start_clock = 0  # where a fresh cluster starts: 0, or a restored checkpoint's clock
        self.restore: dict[str, Any] | None = None  # the checkpoint the cluster started from
        self.hostname = socket.gethostname()[:256] if hostname is None else hostname
        # with a journal, the coordinator is restarted when it dies: members wait for it
        self.supervised = False
        self._process_gone = process_gone
        # the server ranks on the hash ring, and the move under way (coordinator/scaling.py)
        self.ring: list[int] = list(range(num_servers))
        self.move: dict[str, Any] | None = None
        self.rebuild: dict[str, Any] | None = None  # the rebuild under way (coordinator/rebuild.py)

    @property
    def members(self) -> tuple[Member, ...]:
        return (*self.servers, *self.workers)

    def member(self, role: str, rank: int) -> Member | None:
        members = self.servers if role == "server" else self.workers
        return members[rank] if rank < len(members) else None

    def writers(self) -> list[Member]:
        """The servers a checkpoint needs: all but those drained off the ring (``left``)."""
        return [m for m in self.servers if m.state != LEFT]

    def server_by_identity(self, identity: bytes) -> Member | None:
        return next((m for m in self.servers if m.identity == identity and m.state == ALIVE), None)

    # ---- views ----------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """The cluster view as it goes on the wire: its number, servers and workers with states."""
        view: dict[str, Any] = {
            VIEW_NUMBER: self.view_number,
            "servers": [[m.rank, m.address, m.shown] for m in self.servers],
            "workers": [[m.rank, m.state] for m in self.workers],
            "ring": list(self.ring),
        }
        if self.move is not None:
            view["move"] = dict(self.move)
        if self.rebuild is not None:
            view["rebuild"] = dict(self.rebuild)
        if self.replication > 1:
            view["replication"] = self.replication
        if self.rejoined:
            # a restarted worker comes back at this clock: the servers set its clock to it
            view["rejoined"] = [[r, c] for r, c in sorted(self.rejoined.items())]
        return view

    def publish(self, reason: str) -> tuple[dict[str, Any], list[bytes]]:
        """Move to the next view number: the new view and the live members to send it to."""
        self.view_number += 1
        log.info("view %d: %s", self.view_number, reason)
        return self.view(), [m.identity for m in self.members if m.state == ALIVE and m.identity]

    def view_for(self, m: Member) -> dict[str, Any]:
        """The view a newly registered member gets: with its incarnation and the cluster size."""
        extra: dict[str, Any] = {"start_clock": self.start_clock, "supervised": self.supervised}
        if self.restore is not None:
            extra["restore"] = self.restore
        return {
            **extra,
            **self.view(),
            INCARNATION: m.incarnation,
            "num_servers": len(self.servers),
            "num_workers": len(self.workers),
        }

    def to_record(self) -> dict[str, Any]:
        """The journal's record of this membership (see coordinator/journal.py)."""
        return {
            "t": "view",
            VIEW_NUMBER: self.view_number,
            "ring": list(self.ring),
            "move": self.move,
            "rebuild": self.rebuild,
            "members": [
                [m.role, m.rank, m.shown, m.address, m.host, m.pid, m.incarnation, m.identity]
                for m in self.members
            ],
        }

    def load_record(self, record: dict[str, Any], now: float) -> None:
        """Take a journal's membership back (a restarted coordinator): the live members keep
        their incarnations and have the heartbeat timeout to beat again."""
        self.view_number = int(record[VIEW_NUMBER])
        self.ring = list(record.get("ring") or self.ring)
        self.move = record.get("move")
        self.rebuild = record.get("rebuild")
        for role, rank, state, address, host, pid, incarnation, identity in record["members"]:
            while role == "server" and rank >= len(self.servers):  # a server that joined
                self.servers.append(Member("server", len(self.servers)))
            m = self.member(role, rank)
            if m is None:
                continue
            m.state, m.address, m.host, m.pid = state, address, host, pid
            m.rebuilding = state == REBUILDING
            if m.rebuilding:
                m.state = ALIVE
            m.incarnation, m.identity = incarnation, identity
            m.last_seen, m.link, m.link_up = now, -1, False

    def current_clock(self) -> int:
        """The cluster's clock as the live servers last reported it (their min clocks)."""
        clocks = [m.clock for m in self.servers if m.state == ALIVE]
        return max(clocks, default=self.start_clock)

    # ---- registration ---------------------------------------------------------------------

    def _activate(self, m: Member, identity: bytes, h: RegisterMsg, now: float) -> None:
        m.state, m.identity = ALIVE, identity
        m.address = h.get("address") or ""
        m.host, m.pid = h.get("host") or "", h.get("pid") or 0
        m.incarnation = secrets.randbits(62) + 1
        m.last_seen = now
        m.link, m.link_up = -1, False  # known from its first heartbeat on

    def superseded(self, h: RegisterMsg, now: float) -> Member | None:
        """The live server that registering server ``h`` replaces at once, if any: ``h`` asks
        for its rank, it ran on this host (same name), its pid is gone here, and it missed two
        heartbeats (so a live namesake in another pid namespace, still beating, is never taken
        for dead). Saves a replacement the wait for the heartbeat timeout; the caller declares
        it dead."""
        want = h.get("rank")
        if not h.get("address") or want is None or want >= len(self.servers):
            return None
        m = self.servers[want]
        if m.state != ALIVE or not m.pid or m.host != h.get("host") or m.host != self.hostname:
            return None
        if now - m.last_seen < 2 * self.timeouts.heartbeat_interval:
            return None
        return m if self._process_gone(m.pid) else None

    def register_server(self, identity: bytes, h: RegisterMsg, now: float) -> tuple[Member, bool]:
        """Give registering server ``h`` its rank: (the member, whether it replaces one that
        died or left). Refused when it names no address, or its rank is not free."""
        if not h.get("address"):
            raise Refusal("invalid", "a server must register its address")
        want = h.get("rank")
        if want is not None:
            if want >= len(self.servers) or self.servers[want].state == ALIVE:
                raise Refusal(
                    "taken",
                    f"server rank {want} is not free (the cluster has {len(self.servers)} servers)",
                )
            m = self.servers[want]
        else:
            # a rank drained off the ring is not handed out again: a newcomer joins instead
            free = [s for s in self.servers if s.state in (PENDING, DEAD, LEFT)]
            free = [s for s in free if s.rank in self.ring]
            if not free:
                if all(w.state == PENDING for w in self.workers):
                    raise Refusal(
                        "full", f"all {len(self.servers)} server ranks are taken by live servers"
                    )
                # a running job (workers came): the newcomer joins the ring (coordinator/scaling.py)
                self.servers.append(Member("server", len(self.servers)))
                free = [self.servers[-1]]
            m = free[0]
        replacing = m.state in (DEAD, LEFT)
        self._activate(m, identity, h, now)
        # with replicas, a replacement must not serve the checkpoint's stale rows: it holds
        # nothing until its ranges are copied to it from a live replica (a rank off the ring,
        # a joining server's replacement, holds no range: it joins anew, coordinator/scaling.py)
        m.rebuilding = self.replication > 1 and m.rank in self.ring and (replacing or m.rebuilding)
        return m, replacing

    def wait(self, identity: bytes, h: RegisterMsg, now: float) -> None:
        """Queue a registering worker until every server has registered."""
        self.waiting.append((identity, h, now))

    def admissible(self) -> list[tuple[bytes, RegisterMsg, float]]:
        """The waiting workers to admit now (taken off the queue): none while a server rank
        is still pending."""
        if any(s.state == PENDING for s in self.servers) or not self.waiting:
            return []
        waiting, self.waiting = self.waiting, []
        return waiting

    def admit_worker(
        self, identity: bytes, h: RegisterMsg, now: float
    ) -> tuple[Member, dict[str, Any], bool]:
        """Give worker ``h`` its rank: (the member, the view it gets, whether it rejoins).
        Refused when its rank is out of range or live, or no rank is left."""
        want = h.get("rank")
        if want is not None:
            if want >= len(self.workers):
                raise Refusal(
                    "invalid",
                    f"rank {want} asked for, but the cluster has "
                    f"{len(self.workers)} workers (ranks 0..{len(self.workers) - 1})",
                )
            m = self.workers[want]
            if m.state == ALIVE:
                raise Refusal("taken", f"worker rank {want} is already taken by a live worker")
        else:
            free = [w for w in self.workers if w.state == PENDING]
            if not free:
                raise Refusal(
                    "full",
                    f"the cluster expects {len(self.workers)} workers and every rank has been taken",
                )
            m = free[0]
        rejoin = m.state in (DEAD, LEFT)
        self._activate(m, identity, h, now)
        view = self.view_for(m)
        if rejoin:
            # a restarted worker goes on from where the live workers are, not from 0
            view["start_clock"] = self.rejoined[m.rank] = self.current_clock()
        return m, view, rejoin

    # ---- heartbeats, leaving, liveness ----------------------------------------------------

    def heartbeat(self, h: HeartbeatMsg, now: float, link: int) -> Member:
        """Take a heartbeat that came on connection ``link`` (-1: unknown): the member it
        keeps alive. Refused (``expelled``) unless it is a live member's current incarnation."""
        m = self.member(h["role"], h["rank"])
        drained = m is not None and m.role == "server" and m.state == LEFT
        if drained and m is not None and m.incarnation == h[INCARNATION]:
            # drained (coordinator/scaling.py): it was told to stop, and is not fenced
            raise Refusal("left", f"{m.name} was drained and left the cluster")
        if m is None or m.state != ALIVE or m.incarnation != h[INCARNATION]:
            raise Refusal(
                "expelled",
                f"{h['role']}[{h['rank']}] is not a live member of this cluster "
                "(declared dead or never registered)",
            )
        m.last_seen = now
        m.link, m.link_up = link, link >= 0
        clock = h.get("clock")
        if clock is not None:
            m.clock = clock
            if self.rejoined and m.role == "server":
                # once every live server's min clock has passed a rejoin, it is no news
                low = min(s.clock for s in self.servers if s.state == ALIVE)
                for r, c in list(self.rejoined.items()):
                    if low > c:
                        del self.rejoined[r]
        examples = h.get("examples")
        if examples is not None:
            m.examples = examples
        if h.get("metrics") is not None:
            m.metrics = h.get("metrics")
        return m

    def leave(self, h: LeaveMsg) -> Member | None:
        """A member leaving on purpose: the member, or None if ``h`` names no live incarnation."""
        m = self.member(h["role"], h["rank"])
        if m is None or m.state != ALIVE or m.incarnation != h[INCARNATION]:
            return None
        m.state = LEFT
        return m

    def links_dropped(self, fds: list[int]) -> None:
        """libzmq closed these connections: their members are no longer connected."""
        for m in self.members:
            if m.link in fds:
                m.link_up = False

    def expired(self, now: float) -> list[tuple[Member, str]]:
        """The live members to declare dead now, with why: silent for the heartbeat timeout
        and their connection gone too (a member whose own code holds the GIL stays connected)."""
        limit = self.timeouts.heartbeat_timeout
        return [
            (m, f"no heartbeat for {now - m.last_seen:.1f}s")
            for m in self.members
            if m.state == ALIVE and now - m.last_seen > limit and not m.link_up
        ]

    def mark_dead(self, m: Member, why: str) -> None:
        m.state = DEAD
        log.warning("%s (%s) declared dead: %s", m.name, m.address or f"pid {m.pid}", why)

    def expected_at_barriers(self) -> list[int]:
        """The worker ranks a barrier waits for: every worker not dead and not left."""
        return [w.rank for w in self.workers if w.state in (PENDING, ALIVE)]
