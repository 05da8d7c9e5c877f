"""The coordinator: membership, views, barriers, the table registry, data leases and
checkpoint rounds.

* ``loop.py``  the coordinator's state and its single-threaded loop
"""

from paramserver.config import CheckpointPolicy
from paramserver.coordinator.loop import Coordinator

__all__ = ["CheckpointPolicy", "Coordinator"]
