"""The one way a coordinator state object says no: :class:`Refusal`, a code and a reason.

The state objects (membership, rounds, registry) raise it before they change anything; the
loop turns it into an ``error`` reply with that code, which a worker raises as
:class:`paramserver.errors.RemoteError`. A bad argument (a spec that does not parse, a lease
of a data set that was never handed out) stays a :class:`paramserver.errors.ConfigError`,
answered with the code ``invalid``.
"""

from __future__ import annotations

from paramserver.wire.refusal import Refusal  # one class for the coordinator and the servers

__all__ = ["Refusal"]
