"""The coordinator: membership, views, barriers, the table registry, data leases,
checkpoint rounds and the status, as plain state objects under one thin loop.

* ``loop.py``        :class:`Coordinator`: the ROUTER socket, the dispatch of each message to
                     the state object whose job it is, the timers
* ``membership.py``  members, ranks, registration and rejoin rules, liveness, the view
* ``rounds.py``      checkpoint rounds across every server, periodic ones by a policy
* ``leases.py``      each part of a data set handed out once per epoch; a dead worker's back
* ``barriers.py``    named barriers, their timeouts naming the missing workers
* ``registry.py``    the table registry: idempotent creation, conflicts refused, restore
* ``status.py``      the servers' stats and the heartbeats added up into one status map
* ``collector.py``   the stats requests to the servers, every second
* ``refusal.py``     :class:`Refusal`, how a state object says no (a code and a reason)

Only ``loop.py`` and ``collector.py`` touch sockets; the rest are unit-tested without one.
"""

from paramserver.config import CheckpointPolicy
from paramserver.coordinator.loop import Coordinator

__all__ = ["CheckpointPolicy", "Coordinator"]
