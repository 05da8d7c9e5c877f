"""A worker's watch on the coordinator: its heartbeats and their answers, a coordinator that
went silent (named in the error; waited for when it is restarted from a journal), a request
asked again of a restarted coordinator, and rejoining after being dropped while alive.

:class:`CoordinatorWatch` is a part of :class:`~paramserver.client.session.Session`, which
holds the sockets and the view; see docs/fault-tolerance.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from paramserver.config import Timeouts
from paramserver.errors import NodeLostError, PSTimeoutError, RemoteError
from paramserver.wire.heartbeat import MissedViews
from paramserver.wire.messages import INCARNATION, register_header
from paramserver.wire.transport import Endpoint, Future, Pulse

__all__ = ["CoordinatorWatch"]

log = logging.getLogger(__name__)


class CoordinatorWatch:
    """The coordinator as a worker's session watches it (see the module docstring).

    Example:
        session.wait_coordinator(session.endpoint.request("coordinator", header, what=w), 30)
    """

    rank: int
    coordinator: str
    timeouts: Timeouts
    _ep: Endpoint
    _heartbeat: Pulse | None
    _incarnation: int
    _expelled: str | None
    _clock: int
    _clock_futures: list[Future[Any]]
    _examples: int
    _apply_view: Callable[[dict[str, Any]], None]
    _view_number: int

    def _init_watch(self) -> None:
        self._supervised = False  # the coordinator is restarted when it dies (it journals)
        self._coordinator_boot: int | None = None  # its process's number, from heartbeats
        self._beats = 0  # heartbeats built so far, and the incarnation each one carried
        self._beat_incarnations: dict[int, int] = {}
        self._coordinator_seen = 0.0  # when it last answered a probe (see _check_coordinator)
        self._probed = 0.0  # when it was last probed
        # a view sent while this worker's connection to a restarted coordinator was not back
        self._missed = MissedViews()

    def _catch_up_view(self) -> None:
        """Ask for a view the coordinator has and this worker missed; take it once answered."""
        self._missed.catch_up(self._view_number, self._ask_view, self._apply_view)

    def _ask_view(self) -> Future[Any]:
        return self._ep.request(
            "coordinator", {"kind": "get_view"}, what="view from the coordinator"
        )

    def _rejoin(self, why: str) -> None:
        """Register again under this worker's rank after the coordinator dropped it while it
        was alive (paused, cut off for longer than the heartbeat timeout): it goes on at the
        cluster's current clock, as a restarted worker would."""
        fut = self._ep.request(
            "coordinator",
            register_header("worker", self.rank),
            what=f"worker[{self.rank}] rejoining the coordinator at {self.coordinator}",
        )
        try:
            reply = self.wait_coordinator(fut, self.timeouts.connect)
        except (PSTimeoutError, RemoteError) as exc:
            raise NodeLostError(
                f"worker[{self.rank}] was dropped by the coordinator ({why}) and could not "
                f"rejoin: {exc}"
            ) from None
        view = reply["view"]
        self._incarnation = int(view[INCARNATION])  # beats carry it from now on
        self._expelled = None
        self._clock = int(view.get("start_clock") or self._clock)
        self._clock_futures = []
        self._apply_view(view)
        log.warning(
            "worker[%d] was dropped by the coordinator while alive (%s); rejoined at clock %d",
            self.rank,
            why,
            self._clock,
        )

    def _check_coordinator(self) -> None:
        """Raise if the coordinator has not answered a heartbeat for the heartbeat timeout (one
        that is restarted when it dies: for the connect timeout more). Heartbeats unanswered
        for the heartbeat timeout (this worker was paused, cut off, or its own code held the
        GIL) are checked with one heartbeat from here first: answered ``expelled``, this worker
        rejoins."""
        beat = self._heartbeat
        if beat is None:
            return
        now = time.monotonic()
        if now - max(beat.last_answer, self._coordinator_seen) <= self.timeouts.heartbeat_timeout:
            return
        if now - self._probed >= self.timeouts.heartbeat_timeout:  # once per timeout at most
            self._probed = now
            if self._probe():
                return
        quiet = time.monotonic() - max(beat.last_answer, self._coordinator_seen)
        limit = self.timeouts.heartbeat_timeout
        if self._supervised:
            limit += self.timeouts.connect
        if quiet > limit:
            raise NodeLostError(
                f"the coordinator at {self.coordinator} has not answered worker[{self.rank}]'s "
                f"heartbeats for {quiet:.1f}s (heartbeat timeout "
                f"{self.timeouts.heartbeat_timeout:.3g}s"
                + (
                    f", and {self.timeouts.connect:.3g}s more for a restart"
                    if self._supervised
                    else ""
                )
                + "): it died or is cut off"
            )

    def _probe(self) -> bool:
        """One heartbeat from this thread: whether the coordinator answered (rejoining if it
        answered that this worker was dropped)."""
        try:
            self._ep.request("coordinator", self._beat_fields(), what="heartbeat").result(
                2 * self.timeouts.heartbeat_interval
            )
        except RemoteError as exc:
            if exc.code != "expelled":
                raise
            self._coordinator_seen = time.monotonic()
            self._rejoin(exc.reason)
            return True
        except (PSTimeoutError, NodeLostError):
            return False
        self._coordinator_seen = time.monotonic()
        return True

    def wait_coordinator(
        self, fut: Future[Any], timeout: float, again: Callable[[], Future[Any]] | None = None
    ) -> Any:
        """The result of request ``fut`` to the coordinator, waiting up to ``timeout`` seconds
        but giving up (NodeLostError naming it) once the coordinator stops answering heartbeats.
        If the coordinator was restarted meanwhile (it lost the request), ``again()`` asks anew.

        Example:
            reply = session.wait_coordinator(session.endpoint.request("coordinator", ...), 30)
        """
        deadline = time.monotonic() + timeout
        boot = self._coordinator_boot
        while True:
            step = min(self.timeouts.heartbeat_interval, deadline - time.monotonic())
            try:
                return fut.result(max(0.0, step))
            except PSTimeoutError:
                if time.monotonic() >= deadline:
                    raise
                self._check_coordinator()
                if again is not None and boot is not None and self._coordinator_boot != boot:
                    log.warning("worker[%d]: the coordinator restarted; asking again", self.rank)
                    boot = self._coordinator_boot
                    fut = again()

    def _beat(self) -> dict[str, Any]:
        """This worker's heartbeat (on the heartbeat thread): who it is, its clock, its count."""
        # the Pulse numbers its beats 1, 2, ...: remember which incarnation each one spoke for
        self._beats += 1
        self._beat_incarnations[self._beats] = self._incarnation
        self._beat_incarnations.pop(self._beats - 64, None)
        return {**self._beat_fields(), "examples": self._examples}

    def _beat_fields(self) -> dict[str, Any]:
        """Who this worker is and its clock (a probe of the coordinator sends only these)."""
        return {
            "kind": "heartbeat",
            "role": "worker",
            "rank": self.rank,
            INCARNATION: self._incarnation,
            "clock": self._clock,
        }

    def _beat_answered(self, header: dict[str, Any]) -> None:
        """The coordinator refuses a heartbeat of a member it declared dead: expelled (unless
        that beat spoke for an incarnation before the current one)."""
        if (
            header["kind"] == "error"
            and self._beat_incarnations.get(header["id"]) == self._incarnation
        ):
            self._expelled = header["message"]
        elif isinstance(header.get("view"), dict):
            self._coordinator_boot = header["view"].get("boot")
            self._missed.heard(header["view"])
