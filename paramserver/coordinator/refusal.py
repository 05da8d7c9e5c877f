"""The one way a coordinator state object says no: :class:`Refusal`, a code and a reason.

The state objects (membership, rounds, registry) raise it before they change anything; the
loop turns it into an ``error`` reply with that code, which a worker raises as
:class:`paramserver.errors.RemoteError`. A bad argument (a spec that does not parse, a lease
of a data set that was never handed out) stays a :class:`paramserver.errors.ConfigError`,
answered with the code ``invalid``.
"""

from __future__ import annotations

__all__ = ["Refusal"]


class Refusal(Exception):
    """A request the coordinator turns down: ``code`` for the error reply, and the reason.

    Example:
        raise Refusal("taken", "worker rank 2 is already taken by a live worker")
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
