"""Failover with replication=2: a server killed with SIGKILL, and the next training step
completes on the live copies of its ranges (no restart, no checkpoint to restore).

For each kill, a fresh cluster of 3 servers: the seconds from the SIGKILL to the next
completed step, the detection (SIGKILL until the coordinator's view no longer lists the server
as alive, polled every 5 ms from a thread of its own), and their difference, the failover after
detection (target: under 1 s). Then training goes on until the killed rank's replacement is
rebuilt from the live copies (server/rebuild.py): the rebuild's seconds (from its announcement
to the view that lists the replacement alive, as the coordinator's status reports it) and the
bytes its sources sent.

    python benchmarks/failover.py                    # default timeouts, 10 kills
    python benchmarks/failover.py --quick            # 1 kill
    python benchmarks/failover.py --heartbeat-timeout 2
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import numpy as np
from common import emit, parser

import paramserver as ps
from paramserver.wire.transport import Endpoint, new_context


def watch_view(
    address: str, rank: int, since: float, out: list[float], stop: threading.Event
) -> None:
    """Put into ``out`` the seconds from ``since`` until the view lists ``rank`` as not alive."""
    ctx = new_context()
    ep = Endpoint(ctx, request_timeout=5.0)
    try:
        ep.connect("coordinator", address)
        while not stop.is_set():
            view = ep.request("coordinator", {"kind": "get_view"}, what="view").result(5.0)["view"]
            states = {r: s for r, _, s in view["servers"]}
            if states[rank] != "alive":
                out.append(time.monotonic() - since)
                return
            stop.wait(0.005)
    finally:
        ep.close()
        ctx.term()


def rebuilds(client: ps.Client) -> list[dict[str, float]]:
    """The rebuilds the coordinator finished: rank, seconds, rows, bytes."""
    ask = client.endpoint.request("coordinator", {"kind": "status"}, what="status")
    done: list[dict[str, float]] = ask.result(10)["status"]["rebuilds"]
    return done


def one_kill(
    args: object, timeouts: ps.Timeouts, victim: int, transport: str
) -> tuple[float, float, dict[str, float]]:
    with ps.LocalCluster(servers=3, workers=1, timeouts=timeouts, replication=2) as cluster:
        client = cluster.connect(transport=transport)
        emb = client.sparse_table("emb", dim=16, consistency="sync")
        dense = client.dense_table("w", shape=(100_000,), consistency="sync")
        step = [0]

        def train() -> None:
            keys = np.arange(step[0], step[0] + 1000, dtype=np.uint64)
            rows = emb.pull(keys)
            w = dense.pull()
            emb.push(keys, np.ones_like(rows)).result()
            dense.push(np.ones_like(w)).result()
            client.clock()
            step[0] += 1

        for _ in range(10):
            train()
        pid = cluster.pids[f"server {victim}"]
        detected: list[float] = []
        stop = threading.Event()
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        watcher = threading.Thread(
            target=watch_view, args=(cluster.address, victim, killed, detected, stop), daemon=True
        )
        watcher.start()
        train()
        moved = time.monotonic() - killed
        watcher.join(timeout=timeouts.heartbeat_timeout + timeouts.connect)
        stop.set()
        deadline = time.monotonic() + timeouts.heartbeat_timeout + timeouts.connect
        while not rebuilds(client) and time.monotonic() < deadline:
            train()  # the workers write to the replacement from a step's end on
        done = rebuilds(client) or [{"seconds": float("nan"), "bytes": 0, "rows": 0}]
        for _ in range(3):  # and it goes on
            train()
        return moved, detected[0] if detected else float("nan"), done[0]


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0)
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--transport", default="auto", help="auto (dense over shared memory) or tcp")
    args = p.parse_args()
    kills = args.repeat or (1 if args.quick else 10)
    timeouts = ps.Timeouts(
        heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout
    )
    moved, detect, after, rebuilt = [], [], [], []
    for i in range(kills):
        victim = i % 3
        m, d, r = one_kill(args, timeouts, victim, args.transport)
        rebuilt.append(r)
        moved.append(m)
        detect.append(d)
        after.append(m - d)
        emit("failover", f"server[{victim}] SIGKILL to next completed step", m, "s",
             detection=round(d, 4), after_detection=round(m - d, 4))  # fmt: skip
    emit(
        "failover",
        f"median over {kills} kills: detection (heartbeat_timeout {args.heartbeat_timeout}s)",
        statistics.median(detect),
        "s",
        target=args.heartbeat_timeout,
        higher_is_better=False,
    )
    emit(
        "failover",
        f"median over {kills} kills: next completed step after detection (replication=2)",
        statistics.median(after),
        "s",
        target=1.0,
        higher_is_better=False,
    )
    emit(
        "failover",
        f"median over {kills} kills: SIGKILL to next completed step (replication=2)",
        statistics.median(moved),
        "s",
    )
    emit(
        "failover",
        f"median over {kills} kills: rebuild of the replacement from the live copies",
        statistics.median(r["seconds"] for r in rebuilt),
        "s",
        bytes=int(statistics.median(r["bytes"] for r in rebuilt)),
        rows=int(statistics.median(r["rows"] for r in rebuilt)),
    )


if __name__ == "__main__":
    main()
