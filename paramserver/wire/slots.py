"""Shared-memory slots between a worker and a server on the same host.

A worker's large request arrays (the gradient of a sparse push, the keys of a first pull) and
the arrays of the reply (a pull's rows) need not cross the socket when both processes see the
same memory. The worker creates a few *slots* per server, each a segment under ``/dev/shm``
that the server maps once (``attach_slot``, checked by a nonce like the dense segments, see
:mod:`paramserver.wire.shm`). A request then names its slot; the worker writes its arrays into it,
the server reads them there and writes its reply's arrays after them (a pull gathers its rows
straight into the slot); only the headers travel over ZeroMQ.

A slot belongs to one request at a time, from its send until its answer was parsed. Slots are
attached asynchronously: a request that finds none free goes as frames, as it does to a server
on another host (which refuses the first attach; the worker then never asks it again).

Example:
    pool = SlotPool(endpoint, "server[0]", rank=0)
    got = pool.take(6_400_000)          # None until a slot of that size is attached
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.wire import shm
from paramserver.wire.transport import Endpoint, Future

__all__ = ["SlotPool"]

log = logging.getLogger(__name__)

MIN_SLOT_BYTES = 1 << 20
MAX_SLOT_BYTES = 1 << 30  # larger requests travel as frames
SLOTS_PER_SERVER = 4  # requests in flight to one server that can use a slot


@dataclass
class _Slot:
    id: int
    seg: shm.Segment
    busy: bool = False

    @property
    def region(self) -> np.ndarray:
        return self.seg.regions[0]


class SlotPool:
    """The slots of one worker with one server (see the module docstring)."""

    def __init__(self, ep: Endpoint, server: str, rank: int) -> None:
        self.ep = ep
        self.server = server
        self.rank = rank
        self.slots: dict[int, _Slot] = {}
        self.attaching: dict[int, shm.Segment] = {}
        self.refused = False  # another host (or no /dev/shm there): frames only
        self.closed = False
        self.used = 0  # requests that went in a slot

    def take(self, nbytes: int) -> tuple[int, np.ndarray] | None:
        """A free slot of at least ``nbytes``, marked busy: (slot id, its uint8 region); None
        if there is none (a bigger one is then attached for the next requests)."""
        if self.refused or self.closed or nbytes > MAX_SLOT_BYTES:
            return None
        fits = [s for s in self.slots.values() if not s.busy and s.region.nbytes >= nbytes]
        if fits:
            slot = min(fits, key=lambda s: s.region.nbytes)
            slot.busy = True
            self.used += 1
            return slot.id, slot.region
        if not self.attaching:
            self._grow(nbytes)
        return None

    def release(self, slot_id: int) -> None:
        slot = self.slots.get(slot_id)
        if slot is not None:
            slot.busy = False

    def _grow(self, nbytes: int) -> None:
        """Attach a slot of at least ``nbytes`` (a new id, or replacing the smallest free one
        when every id is in use)."""
        size = max(MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length())
        free_ids = [i for i in range(SLOTS_PER_SERVER) if i not in self.slots]
        if free_ids:
            slot_id = free_ids[0]
        else:
            idle = [s for s in self.slots.values() if not s.busy]
            if not idle:
                return
            # retired at once: no request may name this id until the new slot replaced it
            smallest = min(idle, key=lambda s: s.region.nbytes)
            slot_id = smallest.id
            del self.slots[slot_id]
            smallest.seg.close()
        seg = shm.create(size, regions=1)
        if seg is None:
            self.refused = True
            return
        self.attaching[slot_id] = seg
        fut = self.ep.request(
            self.server,
            {
                "kind": "attach_slot",
                "rank": self.rank,
                "slot": slot_id,
                "path": seg.path,
                "nonce": seg.nonce,
                "size": size,
            },
            what=f"attaching a {size >> 20} MiB shared-memory slot on {self.server}",
        )

        def attached(f: Future[dict[str, Any]]) -> None:
            seg.unlink()  # mapped by the server (or refused): no name left behind
            self.attaching.pop(slot_id, None)
            err = f.error
            if self.closed or err is not None:
                seg.close()
                if err is not None and not self.closed:
                    log.info("%s: no shared-memory slots (%s); using frames", self.server, err)
                    self.refused = True
                return
            self.slots[slot_id] = _Slot(slot_id, seg)

        fut.add_done_callback(attached)

    def close(self) -> None:
        """Unmap every slot (the server drops its mappings when this worker leaves)."""
        self.closed = True
        for slot in self.slots.values():
            slot.seg.close()
        for seg in self.attaching.values():
            seg.close()
        self.slots.clear()
        self.attaching.clear()
