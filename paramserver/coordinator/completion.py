"""When a job is done, and how a coordinator with ``--exit-when-done`` ends it.

The rule. The job is done once every one of its workers has registered and then left for
good: each either left (``close()``: a graceful leave, final at once) or was declared dead
(its heartbeats stopped for the heartbeat timeout) and no restarted worker took its rank
back within ``grace`` seconds of that. A worker rank never registered keeps the job going, so
does a worker waiting for admission, so does a dead one inside its grace (a Kubernetes Job,
a supervisor, or a person may still restart it; it then rejoins and the job goes on).

The end, once done:

1. with a checkpoint policy, a final checkpoint round: after a round in progress (periodic or
   asked for) finished, one at the clock the servers report (with no live worker left, the
   furthest clock trained), retried while a server answers ``too_late`` or is not alive, up
   to the policy's round timeout. A final checkpoint that cannot be written is logged as an
   error and the end goes on (the periodic ones stay);
2. every live server is sent ``stop`` (the message ``paramserver run`` ends a cluster with);
   a server ends its process with status 0 on it;
3. once every server's connection is gone (or after the heartbeat timeout), the coordinator's
   loop stops: ``paramserver coordinator`` returns 0.

Plain logic over the coordinator's state; the loop calls :meth:`Completion.tick` between
messages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paramserver.coordinator.membership import ALIVE, DEAD, LEFT
from paramserver.coordinator.refusal import Refusal
from paramserver.errors import ConfigError

if TYPE_CHECKING:
    from paramserver.coordinator.loop import Coordinator
    from paramserver.coordinator.membership import Membership

__all__ = ["DEFAULT_GRACE", "Completion", "job_done"]

log = logging.getLogger(__name__)

# seconds a dead worker's rank is kept open for a restarted worker: a Kubernetes Job makes a
# new pod after a back-off of 10 s, doubling, and the pod must be scheduled and start
DEFAULT_GRACE = 300.0

TRAINING, FINAL_ROUND, STOPPING = "training", "final checkpoint", "stopping"


def job_done(members: Membership, dead_since: dict[int, float], now: float, grace: float) -> bool:
    """Whether every worker registered and then left for good (see the module docstring).
    ``dead_since`` maps a dead worker's rank to when it was first seen dead: updated here.

    Example:
        job_done(coord.members, {}, time.monotonic(), grace=300.0)
    """
    for w in members.workers:
        if w.state == DEAD:
            dead_since.setdefault(w.rank, now)
        else:
            dead_since.pop(w.rank, None)
    if members.waiting:
        return False
    return all(
        w.state == LEFT or (w.state == DEAD and now - dead_since[w.rank] >= grace)
        for w in members.workers
    )


class Completion:
    """Ends the job once it is done: a final checkpoint, ``stop`` to the servers, and the
    coordinator's loop stopped.

    Example:
        coord.completion = Completion(coord, grace=300.0)   # then coord.serve()
    """

    def __init__(self, coord: Coordinator, grace: float = DEFAULT_GRACE) -> None:
        if not grace >= 0:
            raise ConfigError(f"the worker restart grace must be >= 0 seconds, got {grace}")
        self.coord = coord
        self.grace = grace
        self.phase = TRAINING
        self.dead_since: dict[int, float] = {}
        self._round: int | None = None  # the final round in flight
        self._latest: Any = None  # rounds.latest when it started: changed once it committed
        self._retry_at = 0.0
        self._give_up_at = 0.0
        self._stop_by = 0.0
        self._linked: set[int] = set()  # the servers whose connection was up at the stop

    def tick(self, now: float) -> None:
        """Move the end on by what happened since the last call."""
        coord = self.coord
        if self.phase == TRAINING:
            if not job_done(coord.members, self.dead_since, now, self.grace):
                return
            workers = coord.members.workers
            log.info(
                "job done: %d workers left, %d dead and not restarted within %gs",
                sum(w.state == LEFT for w in workers),
                sum(w.state == DEAD for w in workers),
                self.grace,
            )
            policy = coord.rounds.policy
            if policy is None:
                self._stop_servers(now)
                return
            self.phase = FINAL_ROUND
            # a heartbeat sent after the last view reports the clock the tables stand at
            self._retry_at = now + coord.timeouts.heartbeat_interval
            self._give_up_at = now + policy.timeout
        if self.phase == FINAL_ROUND:
            self._final_round(now)
        elif self.phase == STOPPING:
            # a server is gone once its connection closed; one whose connection libzmq did not
            # name is gone once declared dead (its heartbeats stopped)
            gone = all(
                m.state != ALIVE or (m.rank in self._linked and not m.link_up)
                for m in coord.members.servers
            )
            if gone or now > self._stop_by:
                if not gone:
                    log.warning(
                        "exit when done: %s still connected after the stop; exiting anyway",
                        ", ".join(m.name for m in coord.members.servers if m.state == ALIVE),
                    )
                else:
                    log.info("job done: every server stopped; the coordinator exits")
                coord.stop()

    def _final_round(self, now: float) -> None:
        coord = self.coord
        rounds = coord.rounds
        if self._round is not None:
            if self._round in rounds.rounds:
                return  # the servers are writing
            self._round = None
            if rounds.latest is not self._latest:
                self._stop_servers(now)  # written (CheckpointRounds.commit logged where)
                return
            self._retry_at = now + coord.timeouts.heartbeat_interval
        if rounds.rounds or now < self._retry_at:
            return  # a round in progress finishes first
        if now > self._give_up_at:
            log.error("exit when done: no final checkpoint could be written; stopping anyway")
            self._stop_servers(now)
            return
        assert rounds.policy is not None
        clocks = [m.clock for m in coord.members.servers if m.state == ALIVE]
        try:
            rnd = rounds.start(
                Path(rounds.policy.directory),
                max(clocks, default=0),
                max(0.0, self._give_up_at - now),
                None,
                coord.members.servers,
                now,
            )
        except Refusal as exc:  # a server is being replaced: try again a little later
            log.warning("exit when done: final checkpoint not started yet: %s", exc.message)
            self._retry_at = now + coord.timeouts.heartbeat_interval
            return
        self._round, self._latest = rnd.round_id, rounds.latest
        for rank in sorted(rnd.waiting):
            coord.router.send(
                coord.members.servers[rank].identity,
                {"kind": "checkpoint", "id": rnd.round_id, "path": str(rnd.partial),
                 "clock": rnd.clock},
            )  # fmt: skip

    def _stop_servers(self, now: float) -> None:
        coord = self.coord
        live = [m for m in coord.members.servers if m.state == ALIVE and m.identity]
        log.info("job done: stopping %d servers", len(live))
        for m in live:
            coord.router.send(m.identity, {"kind": "stop", "id": 0})
        self._linked = {m.rank for m in live if m.link_up}
        self.phase = STOPPING
        self._stop_by = now + coord.timeouts.heartbeat_timeout + coord.timeouts.heartbeat_interval
