"""A server's link to the coordinator: registering (rank, view, heartbeat, the tables to hold),
applying the views it sends (live workers, rejoined clocks), and its orders (checkpoint, stop).

Fencing: a server that was declared dead (paused with SIGSTOP, or cut off, for longer than the
heartbeat timeout) and replaced must neither serve nor change a table when it comes back. So

* a heartbeat answered ``expelled`` (this incarnation is no longer a member) stops the server;
* a request that carries a newer view number than this server has seen, or any request while
  the coordinator has not answered a heartbeat for the heartbeat timeout, is admitted only
  once the coordinator confirmed that this process still holds its rank (one ``get_view``);
  a server that no longer holds it refuses the request (``fenced``) and stops. If the
  coordinator cannot be asked, a worker's request (it names the view it routes by, in which
  this address holds the rank) is served, and a request that names no view is refused
  (``unconfirmed``);
* a heartbeat answer counts from when its beat was sent (``wire/heartbeat.py``): answers held
  up by a cut link say nothing about the time since.

A restarted coordinator (its process number, ``boot``, changes in the heartbeats' answers)
may have lost what was sent to it before it died, and the views it sent before this server's
connection came back: the server sends its reports of moves and rebuilds (``move_done``) again
(:meth:`CoordinatorLink.report`; the coordinator counts each source once), and a server whose
heartbeat answer names a newer view than its own asks for it (``get_view``).

A coordinator that does not answer for the heartbeat timeout is logged (it is named with its
address); requests go on being served while it is away, and the server stops once it has been
silent for ``heartbeat_timeout + connect`` seconds (a restarted coordinator comes back sooner).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from paramserver.config import Timeouts
from paramserver.errors import PSError, RemoteError
from paramserver.server import snapshot
from paramserver.server.consistency import Clocks
from paramserver.server.snapshot import Snapshots
from paramserver.server.state import ServerState
from paramserver.server.table import make_table
from paramserver.spec import TableSpec
from paramserver.wire import protocol
from paramserver.wire.heartbeat import MissedViews
from paramserver.wire.messages import INCARNATION, VIEW_NUMBER, register_header
from paramserver.wire.paths import Paths
from paramserver.wire.refusal import Refusal
from paramserver.wire.transport import Endpoint, Pulse, Security

__all__ = ["CoordinatorLink"]

log = logging.getLogger(__name__)


class CoordinatorLink:
    """The coordinator as a server sees it (see the module docstring).

    Example:
        link = CoordinatorLink(ctx, "tcp://10.0.0.1:7000", state, paths, snaps, Timeouts(),
                               None, progress=server.progress, stop=threading.Event())
        link.register(wanted_rank=None)
    """

    def __init__(
        self,
        ctx: Any,  # the process's ZeroMQ context (wire.transport.new_context)
        coordinator: str,
        state: ServerState,
        paths: Paths,
        snapshots: Snapshots,
        timeouts: Timeouts,
        security: Security | None,
        progress: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        self.ctx = ctx
        self.coordinator = coordinator
        self.state = state
        self.paths = paths
        self.snapshots = snapshots
        self.timeouts = timeouts
        self.security = security
        self.progress = progress  # called when the live set moved the slowest clock
        self.stopping = stop
        self.heartbeat: Pulse | None = None
        self.fenced: str | None = None  # why this process no longer holds its rank
        self._fenced_at = 0.0
        self._confirmed = 0.0  # when the coordinator last confirmed that it does
        self._asked = 0.0  # when it was last asked to (at most once per heartbeat timeout)
        self._silence_told = False  # whether the coordinator's silence was logged
        self.rejoined: dict[int, int] = {}  # the newest view's restarted workers and clocks
        # creates a table the coordinator ordered (the server's Admin.create)
        self.create: Callable[[dict[str, Any]], None] | None = None
        self.early: list[dict[str, Any]] = []  # orders that came before this server's rank
        # told every newer view (ranges moving between servers: server/transfer.py)
        self.on_view: Callable[[dict[str, Any]], None] | None = None
        self.endpoint = Endpoint(
            ctx, request_timeout=timeouts.connect, on_message=self.on_message, security=security
        )
        self.endpoint.connect("coordinator", coordinator)
        # the coordinator's process and view number, from the heartbeats' answers (set on the
        # heartbeat thread), the boot last acted on, the view asked for, the reports sent
        self._boot: int | None = None
        self._boot_seen: int | None = None
        self.missed = MissedViews()
        self.reports: list[dict[str, Any]] = []

    def poll(self, timeout: float) -> None:
        """Handle the coordinator's messages that arrive within ``timeout`` seconds."""
        self.endpoint.poll(timeout)

    def send(self, header: dict[str, Any]) -> None:
        self.endpoint.send("coordinator", header)

    def report(self, header: dict[str, Any]) -> None:
        """Send a ``move_done``, and again whenever the coordinator restarts (the newest few:
        a coordinator counts a source's report of a move once, and ignores an old move's)."""
        self.reports = [*self.reports[-3:], header]
        self.send(header)

    def catch_up(self) -> None:
        """On the loop's turn: a restarted coordinator gets the reports again; a view this
        server missed (its number came in a heartbeat's answer) is asked for."""
        boot = self._boot
        if boot is not None and boot != self._boot_seen:
            if self._boot_seen is not None and self.reports:
                log.warning("%s: the coordinator restarted; sending its %d move reports again",
                            self.state.name, len(self.reports))  # fmt: skip
                for header in self.reports:
                    self.send(header)
            self._boot_seen = boot
        if self.state.rank >= 0:
            self.missed.catch_up(self.state.view, self._ask_view, self.apply_view)

    def _ask_view(self) -> Any:
        return self.endpoint.request(
            "coordinator", {"kind": "get_view"}, what="view from the coordinator"
        )

    def register(self, wanted_rank: int | None) -> None:
        """Register with the coordinator, learn this server's rank and the view, start the
        heartbeat, and create (or restore) the tables this server holds."""
        state = self.state
        deadline = time.monotonic() + self.timeouts.connect
        while True:
            fut = self.endpoint.request(
                "coordinator",
                register_header("server", wanted_rank, state.address),
                what=f"server at {state.address} registering with the coordinator at "
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
        state.rank = int(reply["rank"])
        state.name = f"server[{state.rank}]"
        self.paths.rename(state.name)
        view = reply["view"]
        restore = view.get("restore")
        start = int(restore["clock"]) if isinstance(restore, dict) else 0
        state.clocks = Clocks(int(view["num_workers"]), start=start)
        state.num_servers = int(view["num_servers"])
        state.replication = int(view.get("replication") or 1)
        mine = next((s for s in view.get("servers", []) if s[0] == state.rank), None)
        state.rebuilding = mine is not None and mine[2] == "rebuilding"
        self.apply_view(view)
        # Beat before loading a checkpoint, which can take longer than the heartbeat timeout.
        incarnation = int(view[INCARNATION])
        self.heartbeat = Pulse(
            self.ctx,
            self.coordinator,
            lambda: {
                "kind": "heartbeat",
                "role": "server",
                "rank": state.rank,
                INCARNATION: incarnation,
                "clock": state.clocks.reached,  # with no live worker: the furthest trained
            },
            self.timeouts.heartbeat_interval,
            on_answer=self._beat_answered,
            security=self.security,
            name=f"heartbeat-{state.name}",
        )
        self.heartbeat.start()
        if state.rebuilding:  # a checkpoint's rows are stale: it holds nothing until rebuilt
            log.info("%s: rebuilding: not serving until its ranges are copied", state.name)
        if isinstance(restore, dict) and not state.rebuilding:
            snapshot.restore(state, str(restore["path"]), view, reply.get("tables") or [])
        else:  # a replacement with no checkpoint to load: the tables, empty
            for wire in reply.get("tables") or []:
                spec = TableSpec.from_wire(wire)
                state.tables[spec.name] = make_table(
                    spec, state.rank, state.members, state.replication
                )
        for t in state.tables.values():
            t.max_bytes = state.limits.table_bytes
        early, self.early = self.early, []
        for header in early:
            self.on_message("coordinator", header, [])
        log.info("%s serving at %s", state.name, state.address)

    # ---- fencing ----------------------------------------------------------------------------

    def _beat_answered(self, header: dict[str, Any]) -> None:
        """On the heartbeat thread: a refused heartbeat means this incarnation was expelled."""
        if header["kind"] == "error" and header.get("code") == "expelled":
            self._fence(f"the coordinator refused its heartbeat: {header.get('message')}")
        elif isinstance(header.get("view"), dict):
            self.missed.heard(header["view"])
            self._boot = header["view"].get("boot")

    def _fence(self, why: str) -> None:
        if self.fenced is None:
            self._fenced_at = time.monotonic()
            self.fenced = why
            log.error(
                "%s at %s no longer holds its rank (%s): it refuses every request and stops",
                self.state.name,
                self.state.address,
                why,
            )

    def silence(self) -> float:
        """Seconds since the coordinator last answered a heartbeat (0 before registering)."""
        if self.heartbeat is None:
            return 0.0
        return max(0.0, time.monotonic() - max(self.heartbeat.last_answer, self._confirmed))

    def admit(self, header: dict[str, Any]) -> None:
        """Refuse (``fenced``) a request this process may no longer serve: see the module
        docstring. Asks the coordinator only when the request's view is newer than this
        server's or the coordinator has been silent for the heartbeat timeout."""
        if self.fenced is None:
            wanted = header.get("view")
            newer = isinstance(wanted, int) and wanted > self.state.view
            if newer:
                self.poll(0)  # the view may be on its way
                newer = isinstance(wanted, int) and wanted > self.state.view
            quiet = self.silence() > self.timeouts.heartbeat_timeout
            if newer or (
                quiet and time.monotonic() - self._asked > self.timeouts.heartbeat_timeout
            ):
                self._confirm(self.timeouts.heartbeat_interval)
            if "view" not in header and self.silence() > self.timeouts.heartbeat_timeout:
                # a peer that names no view cannot vouch that this process still holds its
                # rank (a worker's request names the view it routes by: its rank's address in
                # that view is this one), and the coordinator has not confirmed it lately
                raise Refusal(
                    "unconfirmed",
                    f"{self.state.name} at {self.state.address} has not heard from the "
                    f"coordinator for {self.silence():.1f}s and cannot confirm that it still "
                    "holds its rank; ask again once the coordinator is back",
                )
        if self.fenced is not None:
            raise Refusal(
                "fenced",
                f"{self.state.name} at {self.state.address} was replaced and serves nothing: "
                f"{self.fenced}",
            )

    def _confirm(self, timeout: float) -> None:
        """Ask the coordinator whether this process still holds its rank; fence it if not.
        No answer: it cannot be told (the coordinator is away), and the request is served."""
        state = self.state
        self._asked = time.monotonic()
        try:
            view = self.endpoint.request(
                "coordinator", {"kind": "get_view"}, what="view from the coordinator"
            ).result(timeout)["view"]
        except PSError as exc:
            log.debug("%s: could not confirm its rank: %s", state.name, exc)
            return
        self._confirmed = time.monotonic()
        mine = next((s for s in view.get("servers", []) if s[0] == state.rank), None)
        if mine is None or mine[1] != state.address or mine[2] not in ("alive", "rebuilding"):
            self._fence(
                f"view {view.get(VIEW_NUMBER)} gives rank {state.rank} to "
                + (f"{mine[1]} ({mine[2]})" if mine is not None else "nobody")
            )
        else:
            self.apply_view(view)

    def watch_coordinator(self) -> None:
        """Log a coordinator silent for the heartbeat timeout; stop after ``connect`` more.
        A fenced server stops a heartbeat timeout after it was fenced (refusing meanwhile what
        was sent to it, so that its senders learn why)."""
        t = self.timeouts
        if self.fenced is not None:
            if time.monotonic() - self._fenced_at > t.heartbeat_timeout:
                self.stopping.set()
            return
        quiet = self.silence()
        if quiet <= t.heartbeat_timeout:
            if self._silence_told:
                log.warning("%s: the coordinator at %s answers again", self.state.name,
                            self.coordinator)  # fmt: skip
                self._silence_told = False
            return
        if not self._silence_told:
            self._silence_told = True
            log.error(
                "%s: the coordinator at %s has not answered for %.1fs (heartbeat timeout "
                "%.3gs); serving on, and stopping unless it is back within %.3gs",
                self.state.name,
                self.coordinator,
                quiet,
                t.heartbeat_timeout,
                t.connect,
            )
        if quiet > t.heartbeat_timeout + t.connect:
            log.error(
                "%s: the coordinator at %s has been gone for %.1fs: stopping",
                self.state.name,
                self.coordinator,
                quiet,
            )
            self.stopping.set()

    def on_message(self, peer: str, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        """One message of the coordinator's; whatever it holds, the server goes on."""
        try:
            self.handle(header)
        except Exception as exc:  # the loop that polls this link must never end on a message
            log.error("%s: the coordinator's %s message failed: %s", self.state.name,
                      header.get("kind"), str(exc)[:1000])  # fmt: skip

    def handle(self, header: dict[str, Any]) -> None:
        state = self.state
        if header["kind"] == "create_shard":
            if state.rank < 0:  # came with the registration's answer: created once it is read
                self.early.append(header)
            elif self.create is not None:
                self.create(header["spec"])
        elif header["kind"] == "view":
            if state.rank < 0:  # came with the registration's answer: applied once it is read
                self.early.append(header)
            else:
                self.apply_view(header["view"])
        elif header["kind"] == "checkpoint":
            if state.clocks.reached > header["clock"]:
                # already past the boundary: a snapshot now would not be at that clock, and the
                # other servers' would be (the coordinator tries again further ahead)
                self.send(
                    protocol.error_header(
                        header["id"], "too_late",
                        f"{state.name} is already at clock {state.clocks.reached}",
                    ),
                )  # fmt: skip
                return
            self.snapshots.ask(header["id"], header["path"], header["clock"])
            self.progress()
        elif header["kind"] == "stop":
            log.info("%s: stop requested by the coordinator", state.name)
            self.stopping.set()

    def apply_view(self, view: dict[str, Any]) -> None:
        """Take a newer view's live workers (and the clocks of rejoined ones)."""
        state = self.state
        number = view.get(VIEW_NUMBER)
        workers = view.get("workers")
        if not isinstance(number, int) or not isinstance(workers, list) or number <= state.view:
            return
        state.view = number
        ring = view.get("ring")
        if isinstance(ring, list) and ring:
            state.ring = sorted(int(r) for r in ring)
        if self.on_view is not None:
            self.on_view(view)
        live = {int(r) for r, status in workers if status in ("pending", "alive")}
        registered = {int(r) for r, status in workers if status == "alive"}
        rejoined = {int(r): int(c) for r, c in view.get("rejoined") or []}
        clocks = state.clocks
        for r in live - clocks.live:
            if r in rejoined and r < len(clocks.clock):
                # a restarted worker: it goes on at the clock the coordinator gave it
                clocks.clock[r] = rejoined[r]
                state.last_seq.pop(r, None)
        self.paths.workers_left(live, clocks.live - live)
        # a rank that registered, left or came back (a new process: rejoined at another clock)
        # is claimed again by its next connection
        again = {r for r, c in rejoined.items() if self.rejoined.get(r) != c}
        self.rejoined = rejoined
        state.release((registered ^ state.registered) | again)
        state.registered = registered
        if live != clocks.live:
            clocks.set_live(live)
            self.progress()

    def stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat.join(timeout=2)

    def close(self) -> None:
        self.endpoint.close()
