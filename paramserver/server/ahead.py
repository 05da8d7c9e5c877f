"""Pulls that ran ahead of a move: a source sends them back to be asked by the new ring.

A worker switches to a move's new ring at a step's end (server/transfer.py), so the switches
usually lie within one clock of each other. A worker whose step sent nothing (only
``clock()``: it ran out of data, or skipped a step) can be a clock further ahead in sync
training, and then waits at a source in a pull that needs the pushes of a clock that a
switched worker sent to a new owner. That pull cannot be answered here, and the switched
worker, whose next pull a destination holds until the move's end, cannot go on before the
waiting worker switches too: both would wait until the request timeout.

So a source turns such a pull down (code ``moved``): a pull of a worker that has not switched,
at a clock past the first clock any worker reads by the new ring (plus the table's ssp bound),
of a table that is not ``async``. It sends the move's view first, on the connection of the
refusal (so it comes before it); the worker then switches at once, in the middle of its step,
and asks again by the new ring (``RingRouting.rerouting``, client/ring.py). Every server of the
old ring is a source of the move, so every server such a worker waits at sends it back.

Why switching in the middle of a step is safe: the worker's requests before its ``switched``
reach the old owners, those after it the new ones, on one connection each; a source's
``final`` carries its buffered sync pushes of the moving keys (the worker's pushes of this clock
so far among them), which the destination applies before anything the worker sends it later,
so each rank's pushes of a clock are still summed in the order it sent them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paramserver.server.state import ServerState
from paramserver.wire.refusal import Refusal

if TYPE_CHECKING:
    from paramserver.server.transfer import Outgoing

__all__ = ["PULLS", "ran_ahead", "refuse_ahead", "send_back"]

PULLS = frozenset({"pull", "pull_many"})


def _mode(state: ServerState, h: dict[str, Any]) -> tuple[str, int] | None:
    """The consistency of the table a pull names (a group: its first table's), if it is here."""
    name = h["tables"][0] if h["kind"] == "pull_many" and h.get("tables") else h.get("table")
    t = state.tables.get(name) if isinstance(name, str) else None
    return None if t is None else t.spec.mode


def ran_ahead(out: Outgoing | None, state: ServerState, h: dict[str, Any]) -> str | None:
    """Why pull ``h`` must be asked again by the move's new ring (None: it need not).

    Example:
        ran_ahead(transfers.out, state, {"kind": "pull", "rank": 1, "clock": 5, "table": "emb"})
    """
    if out is None or not out.first or h.get("kind") not in PULLS:
        return None
    rank, clock = h.get("rank"), h.get("clock")
    if not isinstance(rank, int) or not isinstance(clock, int) or rank in out.switched:
        return None
    mode = _mode(state, h)
    if mode is None or mode[0] == "async":
        return None
    lead = min(out.first, key=lambda r: (out.first[r], r))
    if clock <= out.first[lead] + mode[1]:
        return None
    return (
        f"{state.name}: pull of worker[{rank}] at clock {clock} needs pushes that worker[{lead}] "
        f"sent by the new ring of move {out.move} from clock {out.first[lead]} on; switch to "
        f"that ring and ask again"
    )


def send_back(
    out: Outgoing | None, state: ServerState, notify: Callable[[int, dict[str, Any]], None] | None
) -> None:
    """Turn down (code ``moved``) the waiting pulls that ran ahead of move ``out``, after
    sending their workers its view (see the module docstring)."""
    if out is None or not out.first or not state.deferred.waiting:
        return
    keep = []
    for d in state.deferred.waiting:
        h, reply = d.item[0], d.item[1]
        why = ran_ahead(out, state, dict(h))
        if why is None:
            keep.append(d)
            continue
        if notify is not None and out.announce:
            notify(int(h["rank"]), out.announce)
        reply.error("moved", why)
    state.deferred.waiting = keep


def refuse_ahead(
    out: Outgoing | None,
    state: ServerState,
    h: dict[str, Any],
    notify: Callable[[int, dict[str, Any]], None] | None,
) -> None:
    """Turn down (code ``moved``) a pull that comes after it ran ahead of move ``out``."""
    why = ran_ahead(out, state, h)
    if why is None:
        return
    assert out is not None
    if notify is not None and out.announce:
        notify(int(h["rank"]), out.announce)
    raise Refusal("moved", why)
