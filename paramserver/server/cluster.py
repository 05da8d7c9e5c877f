"""A server's link to the coordinator: registering (rank, view, heartbeat, the tables to hold),
applying the views it sends (live workers, rejoined clocks), and its orders (checkpoint, stop).
"""

from __future__ import annotations

import logging
import os
import socket as pysocket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from paramserver.config import Timeouts
from paramserver.errors import RemoteError
from paramserver.server import snapshot
from paramserver.server.consistency import Clocks
from paramserver.server.snapshot import Snapshots
from paramserver.server.state import ServerState
from paramserver.server.table import make_table
from paramserver.spec import TableSpec
from paramserver.wire import protocol
from paramserver.wire.paths import Paths
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
        self.rejoined: dict[int, int] = {}  # the newest view's restarted workers and clocks
        # creates a table the coordinator ordered (the server's Admin.create)
        self.create: Callable[[dict[str, Any]], None] | None = None
        self.early: list[dict[str, Any]] = []  # orders that came before this server's rank
        self.endpoint = Endpoint(
            ctx, request_timeout=timeouts.connect, on_message=self.on_message, security=security
        )
        self.endpoint.connect("coordinator", coordinator)

    def poll(self, timeout: float) -> None:
        """Handle the coordinator's messages that arrive within ``timeout`` seconds."""
        self.endpoint.poll(timeout)

    def send(self, header: dict[str, Any]) -> None:
        self.endpoint.send("coordinator", header)

    def register(self, wanted_rank: int | None) -> None:
        """Register with the coordinator, learn this server's rank and the view, start the
        heartbeat, and create (or restore) the tables this server holds."""
        state = self.state
        deadline = time.monotonic() + self.timeouts.connect
        while True:
            fut = self.endpoint.request(
                "coordinator",
                {
                    "kind": "register",
                    "role": "server",
                    "address": state.address,
                    "host": pysocket.gethostname()[:256],
                    "pid": os.getpid(),
                    "rank": wanted_rank,
                },
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
        self.apply_view(view)
        # Beat before loading a checkpoint, which can take longer than the heartbeat timeout.
        incarnation = int(view["token"])  # the wire still calls it token
        self.heartbeat = Pulse(
            self.ctx,
            self.coordinator,
            lambda: {
                "kind": "heartbeat",
                "role": "server",
                "rank": state.rank,
                "token": incarnation,
                "clock": state.clocks.min_clock,
            },
            self.timeouts.heartbeat_interval,
            security=self.security,
            name=f"heartbeat-{state.name}",
        )
        self.heartbeat.start()
        if isinstance(restore, dict):
            snapshot.restore(state, str(restore["path"]), view, reply.get("tables") or [])
        else:  # a replacement with no checkpoint to load: the tables, empty
            for wire in reply.get("tables") or []:
                spec = TableSpec.from_wire(wire)
                state.tables[spec.name] = make_table(spec, state.rank)
        for t in state.tables.values():
            t.max_bytes = state.limits.table_bytes
        early, self.early = self.early, []
        for header in early:
            self.on_message("coordinator", header, [])
        log.info("%s serving at %s", state.name, state.address)

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
            self.apply_view(header["view"])
        elif header["kind"] == "checkpoint":
            if state.clocks.min_clock > header["clock"]:
                # already past the boundary: a snapshot now would not be at that clock, and the
                # other servers' would be (the coordinator tries again further ahead)
                self.send(
                    protocol.error_header(
                        header["id"], "too_late",
                        f"{state.name} is already at clock {state.clocks.min_clock}",
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
        number = view.get("epoch")
        workers = view.get("workers")
        if not isinstance(number, int) or not isinstance(workers, list) or number <= state.view:
            return
        state.view = number
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
