"""Checkpoint rounds: one consistent checkpoint across every server at one clock boundary.

A round starts only when every server is alive and no other round runs: its directory
``root/.partial-<clock>-<round>`` is made, and each server is asked to write its shards there
when it reaches the round's clock. When the last one has answered, the manifest is written
and the directory renamed into place (:func:`paramserver.checkpoint.commit_checkpoint`). A
round fails, and its directory goes, when a server refuses, dies, or its deadline passes.

Periodic rounds (a :class:`paramserver.config.CheckpointPolicy`) aim a few clocks ahead of
the clocks the servers report, every N seconds or at every N-th clock. Heartbeats report
clocks late, so a server may already be past the target: it answers ``too_late``, and a
periodic round is then dropped quietly and the next one aims twice as far ahead.

Plain state: the loop sends the ``checkpoint`` requests and answers whoever asked.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paramserver import checkpoint
from paramserver.config import CheckpointPolicy
from paramserver.coordinator.membership import ALIVE, Member
from paramserver.coordinator.refusal import Refusal
from paramserver.spec import TableSpec

__all__ = ["CheckpointRounds", "Round"]

log = logging.getLogger(__name__)


@dataclass
class Round:
    """A checkpoint round in progress: the server ranks still to write, and who asked."""

    round_id: int
    root: Path
    partial: Path
    clock: int
    waiting: set[int]
    deadline: float
    requester: tuple[bytes, int] | None = None  # (identity, request id); None: periodic
    errors: list[str] = field(default_factory=list)  # the servers that failed, in their words


class CheckpointRounds:
    """The rounds in progress, when the next periodic one is due, and the newest checkpoint.

    Example:
        rounds = CheckpointRounds(None, now=0.0)
        rnd = rounds.start(Path("ckpt"), 10, 60.0, None, servers, now=0.0)
        for rank in sorted(rnd.waiting):
            done = rounds.answered(rnd.round_id, rank)   # the round, once the last answered
        rounds.commit(done, tables=[], num_servers=1, num_workers=1)   # ckpt/ckpt-00000010-1
    """

    def __init__(
        self,
        policy: CheckpointPolicy | None,
        now: float,
        latest: dict[str, Any] | None = None,
    ) -> None:
        self.policy = policy
        self.rounds: dict[int, Round] = {}
        self._round_ids = 0
        self.next_periodic = now + (policy.every_seconds if policy else 0)
        self.next_clock: int | None = None
        self.lead = 2  # how far ahead of the reported clocks a periodic round aims
        # the newest checkpoint this cluster can restore from: a replaced server loads its shards
        self.latest = latest
        self.last_written: tuple[float, str] | None = None  # (wall time, directory)

    def start(
        self,
        root: Path,
        clock: int,
        timeout: float,
        requester: tuple[bytes, int] | None,
        servers: Sequence[Member],
        now: float,
    ) -> Round:
        """Open a round at ``clock`` into ``root`` for ``servers`` (all of them must be alive);
        the caller asks each server of ``waiting`` to write. Refused (``checkpoint``) while
        another round runs, a server is not alive, or the directory cannot be made."""
        if self.rounds:
            raise Refusal(
                "checkpoint", "a checkpoint is already being written; try again when it is done"
            )
        alive = [m for m in servers if m.state == ALIVE]
        if len(alive) != len(servers):
            raise Refusal(
                "checkpoint",
                "not every server is alive: "
                + ", ".join(f"{m.name} is {m.state}" for m in servers if m.state != ALIVE),
            )
        self._round_ids += 1
        rid = self._round_ids
        partial = root / f".partial-{clock:08d}-{rid}"
        try:
            partial.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise Refusal("checkpoint", f"cannot create {partial}: {exc}") from None
        rnd = self.rounds[rid] = Round(
            rid, root, partial, clock, {m.rank for m in alive}, now + timeout, requester
        )
        log.info("checkpoint round %d at clock %d into %s started", rid, clock, root)
        return rnd

    def answered(self, round_id: int, rank: int) -> Round | None:
        """Server ``rank`` wrote its shards for round ``round_id``: the round, if that was the
        last one it waited for (the caller commits it), else None."""
        rnd = self.rounds.get(round_id)
        if rnd is None:
            return None
        rnd.waiting.discard(rank)
        return rnd if not rnd.waiting else None

    def refused(
        self, round_id: int, code: str, message: str, rank: int | None = None
    ) -> Round | None:
        """A server answered round ``round_id`` with error ``code``: the round to fail, or
        None (no such round, a periodic round that aimed too early, dropped to retry, or
        other servers of ``rank``'s round still to answer: the round then fails naming every
        server that failed, ``Round.errors``)."""
        rnd = self.rounds.get(round_id)
        if rnd is None:
            return None
        if code != "too_late" and rank is not None:
            rnd.errors.append(message)
            rnd.waiting.discard(rank)
            return rnd if not rnd.waiting else None
        if code == "too_late" and rnd.requester is None:
            # a periodic round aimed at a clock some server had already passed (heartbeats
            # report clocks late): drop it quietly and aim further ahead next time
            self.lead = min(2 * self.lead, 1 << 16)
            self.rounds.pop(rnd.round_id, None)
            shutil.rmtree(rnd.partial, ignore_errors=True)
            self.next_periodic = 0.0
            log.debug(
                "checkpoint round %d: %s; retrying %d clocks ahead",
                rnd.round_id,
                message,
                self.lead,
            )
            return None
        return rnd

    def commit(
        self,
        rnd: Round,
        *,
        tables: list[TableSpec],
        num_servers: int,
        num_workers: int,
        servers: list[int] | None = None,
    ) -> Path:
        """Write the manifest of a round every server answered and move it into place: the
        checkpoint's directory. OSError if that fails (the caller fails the round)."""
        del self.rounds[rnd.round_id]
        final = checkpoint.commit_checkpoint(
            rnd.root,
            rnd.partial,
            clock=rnd.clock,
            round_id=rnd.round_id,
            tables=tables,
            num_servers=num_servers,
            num_workers=num_workers,
            keep=self.policy.keep if self.policy else None,
            servers=servers,
        )
        log.info("checkpoint at clock %d written: %s", rnd.clock, final)
        self.latest = {"path": str(final), "clock": rnd.clock}
        self.last_written = (time.time(), str(final))
        return final

    def fail(self, rnd: Round, reason: str) -> None:
        """Give a round up and remove what it wrote (the caller tells its requester)."""
        self.rounds.pop(rnd.round_id, None)
        shutil.rmtree(rnd.partial, ignore_errors=True)
        log.error("checkpoint round %d at clock %d failed: %s", rnd.round_id, rnd.clock, reason)

    def server_lost(self, rank: int) -> list[Round]:
        """The rounds that wait for server ``rank``, which died: the caller fails them (else
        they would block every later checkpoint until their deadline)."""
        return [rnd for rnd in self.rounds.values() if rank in rnd.waiting]

    def expired(self, now: float) -> list[tuple[Round, str]]:
        """The rounds past their deadline, with why (naming the servers still waited for)."""
        return [
            (
                rnd,
                f"timed out waiting for {', '.join(f'server[{r}]' for r in sorted(rnd.waiting))} "
                f"to reach clock {rnd.clock} and write",
            )
            for rnd in self.rounds.values()
            if now > rnd.deadline
        ]

    def make_way(self) -> bool:
        """A worker asks for a checkpoint while periodic rounds run: drop them (they come back
        once the worker's is written) and say True; False if a worker's own round runs."""
        if any(rnd.requester is not None for rnd in self.rounds.values()):
            return False
        for rnd in list(self.rounds.values()):
            self.rounds.pop(rnd.round_id)
            shutil.rmtree(rnd.partial, ignore_errors=True)
            log.info("periodic checkpoint round %d makes way for a worker's", rnd.round_id)
            self.next_periodic = 0.0
        return True

    def start_periodic(
        self, now: float, servers: Sequence[Member], workers_alive: bool
    ) -> Round | None:
        """The periodic round to start now, by the policy, or None: none is due (see
        :meth:`due`), or it cannot start (a server is not alive: skipped, with a warning)."""
        target = self.due(now, [m.clock for m in servers if m.state == ALIVE], workers_alive)
        if target is None or self.policy is None:
            return None
        try:
            return self.start(
                Path(self.policy.directory), target, self.policy.timeout, None, servers, now
            )
        except Refusal as exc:
            log.warning("periodic checkpoint skipped: %s", exc.message)
            return None

    def due(self, now: float, clocks: list[int], workers_alive: bool) -> int | None:
        """The clock a periodic round should start at now, or None: ``clocks`` are the live
        servers' reported clocks. Nothing is due without a policy, while a round runs, or
        while no worker is alive to move the clocks."""
        policy = self.policy
        if policy is None or self.rounds:
            return None
        if not clocks or not workers_alive or max(clocks) >= 1 << 61:
            return None
        if policy.every_clocks is not None:
            # every N clocks: the first round at the next multiple of N
            if self.next_clock is None:
                self.next_clock = (max(clocks) // policy.every_clocks + 1) * policy.every_clocks
            if max(clocks) + self.lead < self.next_clock:
                return None
            target = max(self.next_clock, max(clocks) + self.lead)
            self.next_clock = target + policy.every_clocks
            return target
        if now < self.next_periodic:
            return None
        self.next_periodic = now + policy.every_seconds
        return max(clocks) + self.lead
