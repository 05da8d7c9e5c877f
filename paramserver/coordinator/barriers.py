"""Barriers: a named meeting point that opens once every expected worker has arrived.

The workers expected are those neither dead nor left, asked again whenever a worker arrives,
dies or leaves, so a barrier never waits for a dead worker. A barrier whose deadline passes
(the latest any arrival asked for) fails every waiting worker with an error that names the
workers still missing.

Plain state: the loop answers the waiters it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from paramserver.config import Limits
from paramserver.errors import ConfigError

__all__ = ["Barrier", "Barriers"]

Waiter = tuple[bytes, int]  # (identity, request id) of a worker's barrier request


@dataclass
class Barrier:
    arrived: dict[int, Waiter] = field(default_factory=dict)  # worker rank -> its request
    deadline: float = 0.0


class Barriers:
    """The barriers some worker waits at.

    Example:
        barriers = Barriers()
        barriers.arrive("start", 0, (b"w0", 7), deadline=30.0)
        barriers.complete([0, 1])           # []: worker[1] has not arrived
        barriers.expired(31.0, [0, 1])      # [([(b"w0", 7)], "... waiting for worker[1]")]
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.barriers: dict[str, Barrier] = {}

    def arrive(self, name: str, rank: int, waiter: Waiter, deadline: float) -> None:
        """Worker ``rank`` waits at ``name`` until ``deadline``; ConfigError, changing nothing,
        for a name too long or one barrier too many (:class:`~paramserver.config.Limits`)."""
        if not isinstance(name, str) or len(name) > self.limits.name_chars + 32:  # + "#n"
            raise ConfigError(
                f"a barrier name must be a string of at most {self.limits.name_chars} characters"
            )
        if not isinstance(deadline, float) or deadline != deadline:
            raise ConfigError("a barrier's timeout must be a number of seconds")
        b = self.barriers.get(name)
        identity = waiter[0]
        if (b is None or rank not in b.arrived) and sum(
            w[0] == identity for o in self.barriers.values() for w in o.arrived.values()
        ) >= self.limits.peer_barriers:
            raise ConfigError(
                f"this peer already waits at {self.limits.peer_barriers} barriers, the "
                "coordinator's limit (Limits(peer_barriers=...))"
            )
        if b is None:
            if len(self.barriers) >= self.limits.barriers:
                raise ConfigError(
                    f"{len(self.barriers)} barriers are open, the coordinator's limit "
                    "(Limits(barriers=...)): a program should wait at few names at a time"
                )
            b = self.barriers[name] = Barrier()
        b.arrived[rank] = waiter
        b.deadline = max(b.deadline, deadline)

    @staticmethod
    def missing(b: Barrier, expected: Sequence[int]) -> list[int]:
        return [r for r in expected if r not in b.arrived]

    def complete(self, expected: Sequence[int]) -> list[list[Waiter]]:
        """Close every barrier that all ``expected`` worker ranks reached: their waiters, to
        answer."""
        done = []
        for name, b in list(self.barriers.items()):
            if not self.missing(b, expected):
                del self.barriers[name]
                done.append(list(b.arrived.values()))
        return done

    def expired(self, now: float, expected: Sequence[int]) -> list[tuple[list[Waiter], str]]:
        """Close every barrier past its deadline: its waiters and the error they get."""
        out = []
        for name, b in list(self.barriers.items()):
            if now > b.deadline:
                del self.barriers[name]
                msg = f"barrier {name.split('#')[0]!r} timed out waiting for " + ", ".join(
                    f"worker[{r}]" for r in self.missing(b, expected)
                )
                out.append((list(b.arrived.values()), msg))
        return out
