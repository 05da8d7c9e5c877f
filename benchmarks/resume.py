"""A coordinator killed during a move: how long the move takes to end after it.

A sparse table of ROWS rows x 16 float32 (Adagrad, sync) on 2 servers, one worker training on
random batches of 4,096 keys; a third server joins undisturbed (the baseline, same run), then
that server is drained and the coordinator is SIGKILLed as soon as the drain's view is out.
LocalCluster starts the coordinator again from its journal; the move ends once the sources'
reports, sent again to the new process, are in. Per move: wall time from the view that
announces it (seen by a status request) to the view that switches the ring, with the worker
training all along (the killed one's includes starting a new coordinator process).

    python benchmarks/resume.py                  # 200,000 rows
    python benchmarks/resume.py --quick          # 20,000 rows
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
from common import emit, parser

import paramserver as ps
from paramserver.errors import PSError


def view(client: Any) -> dict[str, Any] | None:
    """The coordinator's view, or None while it does not answer (it is being restarted)."""
    try:
        ask = client.endpoint.request("coordinator", {"kind": "get_view"}, what="view")
        got: dict[str, Any] = ask.result(0.5)["view"]
    except PSError:
        return None
    return got


def train_until(client: Any, emb: Any, rng: np.random.Generator, rows: int, ring: list[int],
                limit: float = 120.0) -> float:  # fmt: skip
    """Train one step at a time until the view's ring is ``ring`` with no move; seconds."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        keys = rng.integers(0, rows, 4096).astype(np.uint64)
        emb.push(keys, emb.pull(keys) * np.float32(0.01)).result(60)
        client.clock()
        v = view(client)
        if v is not None and v["ring"] == ring and "move" not in v:
            return time.perf_counter() - t0
    raise SystemExit(f"the move to ring {ring} did not end within {limit}s")


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rows", type=int, default=0)
    args = p.parse_args()
    rows = args.rows or (20_000 if args.quick else 200_000)
    with ps.LocalCluster(servers=2, workers=1) as cluster:
        client = cluster.connect()
        emb = client.sparse_table("emb", dim=16, optimizer=ps.optim.Adagrad(lr=0.1),
                                  consistency="sync")  # fmt: skip
        emb.pull(np.arange(rows, dtype=np.uint64))
        rng = np.random.default_rng(0)
        rank = cluster.add_server()  # its move is announced when it registered
        base = train_until(client, emb, rng, rows, [0, 1, rank])
        cluster.remove_server(rank)  # answered once its move's view is out
        os.kill(cluster.pids["coordinator"], signal.SIGKILL)
        took = train_until(client, emb, rng, rows, [0, 1])
        restarts = len(cluster.coordinator_restarts)
        case = f"{rows} rows x 16, 2 servers + 1"
        emit("resume", f"{case}: join, undisturbed: announced to switched", base, "s",
             higher_is_better=False)  # fmt: skip
        emit("resume", f"{case}: drain, coordinator SIGKILLed once announced: to switched",
             took, "s", baseline=base, higher_is_better=False, restarts=restarts)  # fmt: skip


if __name__ == "__main__":
    main()
