"""``paramserver drain RANK``: ask the coordinator to drain a server, and wait until it left.

The coordinator moves the server's keys to the others while training goes on (the workers
switch rings at their next step's end; see coordinator/scaling.py and server/transfer.py),
then tells it to stop.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from paramserver.config import from_env, normalize_address
from paramserver.errors import PSTimeoutError
from paramserver.wire.transport import Endpoint, Security, new_context

__all__ = ["add_drain_arguments", "drain_command", "drain_server"]


def add_drain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rank", type=int, help="the server's rank")
    p.add_argument("--coordinator", default=None, help="HOST:PORT (or PS_COORDINATOR)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait until it left")
    p.add_argument("--no-wait", action="store_true", help="return once the drain is accepted")
    p.set_defaults(run=drain_command)


def drain_command(args: argparse.Namespace) -> int:
    """``paramserver drain RANK``: one line on stdout once the server left (or was accepted)."""
    address = normalize_address(args.coordinator or from_env().coordinator or "")
    view = drain_server(
        address, args.rank, token=from_env().token, timeout=args.timeout, wait=not args.no_wait
    )
    state = "draining" if args.no_wait else "drained"
    print(f"server[{args.rank}] {state}: ring {view.get('ring')}", flush=True)
    return 0


def drain_server(
    address: str, rank: int, *, token: str | None, timeout: float = 60.0, wait: bool = True
) -> dict[str, Any]:
    """Drain server ``rank`` of the cluster at ``address``; with ``wait``, return once the view
    says it left (PSTimeoutError after ``timeout`` seconds). Returns the last view seen.
    RemoteError if the coordinator refuses (not on the ring, the last server, with
    replication, or a dense range that would pass ``Limits(table_bytes)`` on the servers left).

    Example:
        drain_server("tcp://10.0.0.1:7000", 2, token=None)
    """
    ctx = new_context()
    ep = Endpoint(ctx, 5.0, security=Security.from_token(token) if token else None)
    deadline = time.monotonic() + timeout
    try:
        ep.connect("coordinator", address)
        what = f"drain of server[{rank}] by the coordinator at {address}"
        ep.request("coordinator", {"kind": "drain", "rank": int(rank)}, what=what).result(5.0)
        while True:
            view: dict[str, Any] = ep.request(
                "coordinator", {"kind": "get_view"}, what=f"view of the coordinator at {address}"
            ).result(5.0)["view"]
            if not wait or any(r == rank and st == "left" for r, _, st in view["servers"]):
                return view
            if time.monotonic() > deadline:
                raise PSTimeoutError(
                    f"server[{rank}] did not leave within {timeout:.3g}s: its keys move once "
                    "every live worker ended a step (clock() or barrier()); ring now "
                    f"{view.get('ring')}"
                )
            time.sleep(0.05)
    finally:
        ep.close()
        ctx.term()
