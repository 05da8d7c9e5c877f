"""Shared-memory slots between a worker and a server on the same host.

A worker's large request arrays (the gradient of a sparse push, the keys of a first pull) and
the arrays of the reply (a pull's rows) need not cross the socket when both processes see the
same memory. The worker creates a few *slots* per server, each a segment under ``/dev/shm``
that the server maps once (``attach_slot``, checked by a nonce like the dense segments, see
:mod:`paramserver.wire.shm`). A request then names its slot; the worker writes its arrays into it,
the server reads them there and writes its reply's arrays after them (a pull gathers its rows
straight into the slot); only the headers travel over ZeroMQ.

A slot belongs to one request at a time, from its send until its answer was parsed, and then
to whoever holds the reply's arrays: a pull whose reply is its result (distinct keys, one
server) hands out the rows where the server gathered them (:meth:`SlotPool.lendable`). The
reference count of a slot's region array counts every such result and every view of it, so a
slot is named by a request again only once nothing holds it: the server never writes memory a
result still shows. Slots are attached asynchronously: a request that finds none free goes as
frames, as it does to a server on another host (which refuses the first attach; the worker
then never asks it again).

Example:
    pool = SlotPool(endpoint, "server[0]", rank=0)
    got = pool.take(6_400_000)          # None until a slot of that size is attached
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramserver.wire import shm
from paramserver.wire.transport import Endpoint, Future, Message

__all__ = ["SlotPool"]

log = logging.getLogger(__name__)

MIN_SLOT_BYTES = 1 << 20
MAX_SLOT_BYTES = 1 << 30  # larger requests travel as frames
SLOTS_PER_SERVER = 4  # requests in flight to one server that can use a slot


@dataclass
class _Slot:
    id: int
    seg: shm.Segment
    # the slot's memory as an array of its own (shm.Segment.typed): the views made of it (a
    # reply's arrays, a result handed out) hold it, so its reference count says who still does
    region: np.ndarray
    busy: bool = False  # a request in flight names it
    written: Callable[[], np.ndarray | None] = lambda: None  # the array put there (array())

    @property
    def free(self) -> bool:
        # 2: this object's reference and getrefcount's argument
        return not self.busy and sys.getrefcount(self.region) == 2


class SlotPool:
    """The slots of one worker with one server (see the module docstring)."""

    def __init__(self, ep: Endpoint, server: str, rank: int) -> None:
        self.ep = ep
        self.server = server
        self.rank = rank
        self.slots: dict[int, _Slot] = {}
        self.attaching: dict[int, shm.Segment] = {}
        self.refused = False  # another host (or no /dev/shm there): frames only
        self.full = False  # /dev/shm had no room for a slot to lend: results are copies
        self.closed = False
        self.used = 0  # requests that went in a slot

    def take(self, nbytes: int, arrays: Sequence[np.ndarray] = ()) -> tuple[int, np.ndarray] | None:
        """A free slot of at least ``nbytes``, marked busy: (slot id, its uint8 region); None
        if there is none (a bigger one is then attached for the next requests). A slot that
        one of ``arrays`` was made in (by :meth:`array`) is the one taken."""
        if self.refused or self.closed or nbytes > MAX_SLOT_BYTES:
            return None
        fits = [
            s
            for s in self.slots.values()
            if not s.busy and s.region.nbytes >= nbytes and any(a is s.written() for a in arrays)
        ]
        fits = fits or [s for s in self.slots.values() if s.region.nbytes >= nbytes and s.free]
        if fits:
            slot = min(fits, key=lambda s: s.region.nbytes)
            slot.busy = True
            self.used += 1
            return slot.id, slot.region
        if not self.attaching:
            self._grow(nbytes)
        return None

    def array(self, at: int, dtype: np.dtype[Any], shape: tuple[int, int]) -> np.ndarray | None:
        """An array of ``shape`` at offset ``at`` of a free slot, for a request's array to be
        written straight into (no copy when it is sent: :meth:`take` then takes that slot for
        a request that carries this very array). Not marked busy: the array, a view of the
        slot, keeps it from other requests until nothing holds it. None if no slot is free (a
        bigger one is then attached for later)."""
        nbytes = at + shape[0] * shape[1] * dtype.itemsize
        if self.refused or self.closed or nbytes > MAX_SLOT_BYTES:
            return None
        fits = [s for s in self.slots.values() if s.region.nbytes >= nbytes and s.free]
        if not fits:
            if not self.attaching:
                self._grow(nbytes)
            return None
        slot = min(fits, key=lambda s: s.region.nbytes)
        out = slot.region[at:nbytes].view(dtype).reshape(shape)
        slot.written = weakref.ref(out)
        return out

    def release(self, slot_id: int) -> None:
        slot = self.slots.get(slot_id)
        if slot is not None:
            slot.busy = False

    def lendable(self, slot_id: int) -> bool:
        """Whether the reply in slot ``slot_id`` may be handed out as a result (the slot is then
        held until nothing holds that result): yes while another slot stays free for the next
        request. When none would, a slot as large is attached for later, up to
        :data:`SLOTS_PER_SERVER`: a loop that holds one result while it pulls the next then
        gets its results without a copy from the next pull on."""
        slot = self.slots.get(slot_id)
        if slot is None or self.closed:
            return False
        if any(s.free for s in self.slots.values() if s is not slot):
            return True
        if not (self.attaching or self.full) and len(self.slots) < SLOTS_PER_SERVER:
            self._grow(slot.region.nbytes, spare=True)
        return False

    def lending(self, slot_id: int, parse: Callable[[Message], Any]) -> Callable[[Message], Any]:
        """``parse`` for a reply in slot ``slot_id`` that may keep the reply's arrays: when
        they lie in the slot and it may be lent (:meth:`lendable`), the header says ``lent``
        and the arrays are writable; the slot is not named again while anything holds them."""

        def parse_lent(msg: Message) -> Any:
            header, arrays = msg
            slot = self.slots.get(slot_id)
            if (
                slot is not None
                and arrays
                and all(a.base is slot.region for a in arrays)
                and self.lendable(slot_id)
            ):
                for a in arrays:
                    a.flags.writeable = True
                header["lent"] = True
            return parse(msg)

        return parse_lent

    def _grow(self, nbytes: int, spare: bool = False) -> None:
        """Attach a slot of at least ``nbytes`` (a new id, or replacing the smallest free one
        when every id is in use); ``spare``: one more, so that a result may be lent (where
        ``/dev/shm`` has no room for it, the slots there are kept and results copied)."""
        size = max(MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length())
        free_ids = [i for i in range(SLOTS_PER_SERVER) if i not in self.slots]
        if free_ids:
            slot_id = free_ids[0]
        else:
            idle = [s for s in self.slots.values() if s.free]
            if not idle:
                return
            # retired at once: no request may name this id until the new slot replaced it
            smallest = min(idle, key=lambda s: s.region.nbytes)
            slot_id = smallest.id
            del self.slots[slot_id]
            smallest.seg.close()
        seg = shm.create(size, regions=1)
        if seg is None:
            if spare:
                self.full = True
            else:
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
            self.slots[slot_id] = _Slot(slot_id, seg, seg.typed(0, np.dtype(np.uint8), size))

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
