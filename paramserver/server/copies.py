"""With replication, the async pushes already in the rows a move brought to a new copy.

A key's old primary may hold it on the new ring too (``partition.replicas_of`` along the
ring's members); then it applies the async pushes of the workers that switched first, and the
rows it sends in its final hold them, while the new copy holds the same pushes until the
move's end (server/transfer.py). The source's ``end`` carries its last sequence number of each
worker; the new copy skips, per key it received from such a source, the pushes at or below it.
A dense table received whole from its old primary that holds it on the new ring too: the same,
for the whole table (``Moved.dense``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from paramserver.partition import HashRing, held_keys
from paramserver.server.state import ServerState

__all__ = ["Moved", "dense_applied", "not_applied"]


@dataclass
class Moved:
    """With replication, after a move received here: a key's old primary may hold it on the
    new ring too, and then it applied the async pushes of the workers that switched before its
    final (the rows it sent hold them); those are the pushes of a sequence number up to its
    ``last_seq`` of that worker then, which this server skips for the keys it received."""

    old: HashRing
    new: HashRing
    replication: int
    seqs: dict[int, dict[int, int]]  # source -> worker -> the last sequence number applied
    # dense tables received from a source that holds them on the new ring too: name -> source
    dense: dict[str, int] = field(default_factory=dict)


def dense_applied(state: ServerState, name: str, rank: int, seq: int) -> bool:
    """Whether async push ``seq`` of worker ``rank`` to dense table ``name`` is in the values
    the last move brought here (its source applied it before its final: see :class:`Moved`)."""
    moved = state.moved
    if not isinstance(moved, Moved) or name not in moved.dense:
        return False
    return seq <= moved.seqs.get(moved.dense[name], {}).get(rank, -1)


def not_applied(state: ServerState, rank: int, seq: int, keys: np.ndarray) -> np.ndarray | None:
    """Which of an async push's ``keys`` to apply here (None: all): not those received in the
    last move whose source holds them on the new ring too and had applied push ``seq`` of
    worker ``rank`` before it sent their rows (see :class:`Moved`)."""
    moved = state.moved
    if not isinstance(moved, Moved) or len(keys) == 0:
        return None
    me, k = state.rank, moved.replication
    received = ~held_keys(keys, moved.old, me, k)
    if not received.any():
        return None
    source = moved.old.route(keys)
    done = np.zeros(len(keys), bool)
    for s in np.unique(source[received]).tolist():
        if seq <= moved.seqs.get(int(s), {}).get(rank, -1):
            done |= received & (source == s) & held_keys(keys, moved.new, int(s), k)
    return None if not done.any() else ~done
